//! The read-only base directory tree, read lazily and cached: it never
//! changes, so nothing read from it ever needs invalidating.
//!
//! Base inodes are numbered by the host's inode number (the base root is
//! `ROOT`), which keeps them stable across remounts and makes hard links in
//! the base one inode here too.

use crate::state::{Ino, Kind, Meta, ROOT};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// What the base says about one inode.
#[derive(Clone, Debug)]
pub struct BaseInode {
    /// Path relative to the base root.
    pub origin: PathBuf,
    pub meta: Meta,
    /// st_blocks of the base file.
    pub blocks512: u64,
}

/// The xattr holding a file's capabilities, which writes, truncates and
/// chowns remove.
pub const CAPABILITY: &[u8] = b"security.capability";

pub type Listing = Arc<Vec<(OsString, Ino, Kind)>>;

pub struct Base {
    root: PathBuf,
    root_host_ino: u64,
    inodes: RwLock<HashMap<Ino, BaseInode>>,
    listings: RwLock<HashMap<PathBuf, Listing>>,
    files: Mutex<HashMap<Ino, Arc<File>>>,
    /// Whether each base file asked about has a security.capability
    /// xattr: every write asks (see `View::drop_capability`), and a
    /// syscall on the base path per write would cost more than the write.
    capability: RwLock<HashMap<Ino, bool>>,
}

impl Base {
    pub fn open(root: &Path) -> std::io::Result<Base> {
        let md = std::fs::metadata(root)?;
        if !md.is_dir() {
            return Err(std::io::ErrorKind::NotADirectory.into());
        }
        let base = Base {
            root: root.to_owned(),
            root_host_ino: md.ino(),
            inodes: RwLock::default(),
            listings: RwLock::default(),
            files: Mutex::default(),
            capability: RwLock::default(),
        };
        base.stat(Path::new(""));
        Ok(base)
    }

    pub fn path(&self, origin: &Path) -> PathBuf {
        self.root.join(origin)
    }

    fn ino_of(&self, host_ino: u64) -> Ino {
        if host_ino == self.root_host_ino {
            ROOT
        } else {
            host_ino
        }
    }

    /// lstat a base path and remember the inode.
    fn stat(&self, origin: &Path) -> Option<Ino> {
        let md = std::fs::symlink_metadata(self.path(origin)).ok()?;
        let ino = self.ino_of(md.ino());
        let meta = Meta::from_metadata(&md)?;
        let mut map = self.inodes.write().unwrap();
        map.entry(ino).or_insert_with(|| BaseInode {
            origin: origin.to_owned(),
            meta,
            blocks512: md.blocks(),
        });
        Some(ino)
    }

    /// The inode named `name` in the base directory `dir`, if there is one.
    pub fn lookup(&self, dir: &Path, name: &OsStr) -> Option<Ino> {
        if name.len() > 255 || name == "." || name == ".." {
            return None;
        }
        self.stat(&dir.join(name))
    }

    pub fn inode(&self, ino: Ino) -> Option<BaseInode> {
        self.inodes.read().unwrap().get(&ino).cloned()
    }

    /// The entries of a base directory (empty if it cannot be read).
    pub fn list(&self, dir: &Path) -> Listing {
        if let Some(l) = self.listings.read().unwrap().get(dir) {
            return l.clone();
        }
        // Each entry is stat()ed now: readdirplus answers with attributes,
        // and later lookups hit the cache.
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.path(dir)) {
            let mut inodes = self.inodes.write().unwrap();
            for e in rd.flatten() {
                let Some((md, meta)) = e
                    .metadata()
                    .ok()
                    .and_then(|md| Meta::from_metadata(&md).map(|m| (md, m)))
                else {
                    continue;
                };
                let ino = self.ino_of(md.ino());
                inodes.entry(ino).or_insert_with(|| BaseInode {
                    origin: dir.join(e.file_name()),
                    meta,
                    blocks512: md.blocks(),
                });
                out.push((e.file_name(), ino, meta.kind));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        let listing = Arc::new(out);
        self.listings
            .write()
            .unwrap()
            .insert(dir.to_owned(), listing.clone());
        listing
    }

    /// Whether the base file `ino` (at `origin`) has a security.capability
    /// xattr. Cached: the base never changes.
    pub fn has_capability(&self, ino: Ino, origin: &Path) -> bool {
        if let Some(&has) = self.capability.read().unwrap().get(&ino) {
            return has;
        }
        let has = crate::sys::get_xattr(&self.path(origin), CAPABILITY).is_ok();
        self.capability.write().unwrap().insert(ino, has);
        has
    }

    /// An open, read-only handle on a base file.
    pub fn file(&self, ino: Ino, origin: &Path) -> std::io::Result<Arc<File>> {
        let mut files = self.files.lock().unwrap();
        if let Some(f) = files.get(&ino) {
            return Ok(f.clone());
        }
        if files.len() > 4096 {
            files.clear();
        }
        let f = Arc::new(File::open(self.path(origin))?);
        files.insert(ino, f.clone());
        Ok(f)
    }
}
