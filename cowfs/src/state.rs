//! The in-memory metadata of a view: every inode a layer has touched, as a
//! delta over the read-only base. It is built of persistent maps, so a clone
//! is O(1): a checkpoint keeps a clone, and a rollback swaps it back in.

use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::journal::Record;

pub type Ino = u64;
/// The root directory (FUSE's root node id).
pub const ROOT: Ino = 1;
/// Inodes created in layers are numbered from here; base inodes keep the
/// host's inode number, so both are stable across remounts.
pub const FIRST_NEW_INO: Ino = 1 << 40;
/// The most data a file keeps inline (see `Node::inline`).
pub const INLINE_MAX: u64 = 4096;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Char,
    Block,
    Socket,
}

impl Kind {
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFCHR => Kind::Char,
            libc::S_IFBLK => Kind::Block,
            libc::S_IFSOCK => Kind::Socket,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ts {
    pub sec: i64,
    pub nsec: u32,
}

impl Ts {
    pub fn now() -> Ts {
        Ts::from(SystemTime::now())
    }
}

impl From<SystemTime> for Ts {
    fn from(t: SystemTime) -> Ts {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Ts {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Ts { sec, nsec }
            }
        }
    }
}

impl From<Ts> for SystemTime {
    fn from(t: Ts) -> SystemTime {
        let d = std::time::Duration::new(t.sec.unsigned_abs(), 0);
        let base = if t.sec >= 0 {
            UNIX_EPOCH + d
        } else {
            UNIX_EPOCH - d
        };
        base + std::time::Duration::from_nanos(t.nsec as u64)
    }
}

/// What `stat` shows, minus the inode number and block count.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub rdev: u32,
    pub atime: Ts,
    pub mtime: Ts,
    pub ctime: Ts,
}

impl Meta {
    pub fn from_metadata(md: &std::fs::Metadata) -> Option<Meta> {
        use std::os::unix::fs::MetadataExt;
        let ts = |sec: i64, nsec: i64| Ts {
            sec,
            nsec: nsec as u32,
        };
        Some(Meta {
            kind: Kind::from_mode(md.mode())?,
            perm: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            nlink: md.nlink() as u32,
            size: md.size(),
            rdev: md.rdev() as u32,
            atime: ts(md.atime(), md.atime_nsec()),
            mtime: ts(md.mtime(), md.mtime_nsec()),
            ctime: ts(md.ctime(), md.ctime_nsec()),
        })
    }
}

/// Where one block of a file lives, when not in the base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    /// In the data file of this inode in layer N.
    Layer(u32),
    /// Reads as zeros (punched or zero-ranged).
    Zero,
}

/// An inode some layer has touched.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub meta: Meta,
    /// Its path in the base, if it came from there: data, directory entries,
    /// link target and xattrs not overridden here are read from it.
    pub origin: Option<PathBuf>,
    /// Directories: entries changed over the base (`None` = whiteout). A
    /// directory without origin is opaque: this is all there is.
    pub entries: imbl::OrdMap<OsString, Option<Ino>>,
    /// Files: blocks changed over the base.
    pub blocks: imbl::OrdMap<u64, Loc>,
    /// Files: bytes of the origin still visible (a truncate lowers it).
    pub base_limit: u64,
    /// Files made in a layer and never bigger than `INLINE_MAX` bytes of
    /// data: the data itself, kept in the metadata (and its journal
    /// records) instead of a data file, which would cost a file creation
    /// (tens of microseconds) per small file. Zeros follow up to the size.
    /// A file with inline data has no blocks.
    pub inline: Option<Vec<u8>>,
    /// Symlinks made in a layer.
    pub symlink: Option<Vec<u8>>,
    /// Extended attributes, once changed (`None` = the origin's).
    pub xattrs: Option<imbl::OrdMap<Vec<u8>, Vec<u8>>>,
}

impl Node {
    pub fn new(meta: Meta, origin: Option<PathBuf>, base_limit: u64) -> Node {
        Node {
            meta,
            origin: origin.clone(),
            entries: imbl::OrdMap::new(),
            blocks: imbl::OrdMap::new(),
            base_limit,
            inline: None,
            symlink: None,
            xattrs: match origin {
                Some(_) => None,
                None => Some(imbl::OrdMap::new()),
            },
        }
    }

    pub fn record(&self, ino: Ino) -> Record {
        Record::Node {
            ino,
            meta: self.meta,
            origin: self.origin.clone(),
            base_limit: self.base_limit,
            inline: self.inline.clone(),
        }
    }
}

/// The metadata of a whole view.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub nodes: imbl::HashMap<Ino, Node>,
    pub next_ino: Ino,
}

impl State {
    pub fn new() -> State {
        State {
            nodes: imbl::HashMap::new(),
            next_ino: FIRST_NEW_INO,
        }
    }

    pub fn alloc_ino(&mut self) -> Ino {
        let ino = self.next_ino.max(FIRST_NEW_INO);
        self.next_ino = ino + 1;
        ino
    }

    /// Replay one record of layer `layer`.
    pub fn apply(&mut self, rec: Record, layer: u32, block_size: u64) {
        match rec {
            Record::Node {
                ino,
                meta,
                origin,
                base_limit,
                inline,
            } => {
                if ino >= FIRST_NEW_INO {
                    self.next_ino = self.next_ino.max(ino + 1);
                }
                match self.nodes.get_mut(&ino) {
                    Some(n) => {
                        n.meta = meta;
                        n.origin = origin;
                        n.base_limit = base_limit;
                        n.inline = inline;
                    }
                    None => {
                        let mut n = Node::new(meta, origin, base_limit);
                        n.inline = inline;
                        self.nodes.insert(ino, n);
                    }
                }
            }
            Record::Symlink { ino, target } => {
                if let Some(n) = self.nodes.get_mut(&ino) {
                    n.symlink = Some(target);
                }
            }
            Record::Entry { dir, name, ino } => match self.nodes.get_mut(&dir) {
                Some(d) => set_entry(d, OsString::from_vec(name), ino),
                None => tracing::warn!("journal: entry in unknown directory {dir}"),
            },
            Record::Xattrs { ino, xattrs } => {
                if let Some(n) = self.nodes.get_mut(&ino) {
                    n.xattrs = Some(xattrs.into_iter().collect());
                }
            }
            Record::Blocks {
                ino,
                first,
                count,
                zero,
            } => {
                if let Some(n) = self.nodes.get_mut(&ino) {
                    let loc = if zero { Loc::Zero } else { Loc::Layer(layer) };
                    for b in first..first + count {
                        n.blocks.insert(b, loc);
                    }
                }
            }
            Record::Truncate { ino, size } => {
                if let Some(n) = self.nodes.get_mut(&ino) {
                    truncate_blocks(n, size, block_size);
                }
            }
            Record::Drop { ino } => {
                self.nodes.remove(&ino);
            }
        }
    }
}

/// Forget the blocks past `size` and the base bytes past it.
pub fn truncate_blocks(n: &mut Node, size: u64, block_size: u64) {
    let keep = size.div_ceil(block_size);
    let (below, _) = n.blocks.split(&keep);
    n.blocks = below;
    n.base_limit = n.base_limit.min(size);
    if let Some(bytes) = &mut n.inline {
        bytes.truncate(size as usize);
    }
}

/// Set a directory entry; a removal in a directory that has no base origin
/// needs no whiteout.
pub fn set_entry(dir: &mut Node, name: OsString, ino: Option<Ino>) {
    if ino.is_none() && dir.origin.is_none() {
        dir.entries.remove(&name);
    } else {
        dir.entries.insert(name, ino);
    }
}
