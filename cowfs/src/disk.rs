//! The on-disk layout of a store and the crash-safe way every metadata file
//! is replaced (write a temporary file, fsync, rename, fsync the directory).
//!
//! ```text
//! STORE/store.json        magic, format version, base path, block size (written once)
//! STORE/stack             layer ids bottom to top, checkpoints: the commit point
//!                         of checkpoint and rollback (see `commit`; stores made
//!                         by older versions have `stack.json` until their
//!                         first commit)
//! STORE/layers/ID/journal metadata records of layer ID (see `journal`)
//! STORE/layers/ID/wal     the fsync log of layer ID while it is the top (see `wal`)
//! STORE/layers/ID/data/INO the blocks of inode INO written in layer ID (sparse;
//!                         none for a small file, whose data is inline: `state`)
//! STORE/trash/            dropped layers, deleted in the background
//! STORE/lock              flock()ed by the daemon while the store is mounted
//! STORE/control.sock      the daemon's control socket (see `control`)
//! ```
//! Files are created 0600 and directories 0700.

use crate::commit;
use crate::error::{Context, Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const MAGIC: &str = "cowfs-store";
/// 2: layers have an fsync log (`wal`), which an older cowfs would ignore
/// after a crash. A format 1 store becomes 2 when first mounted.
pub const FORMAT_VERSION: u32 = 2;
pub const DEFAULT_BLOCK_SIZE: u64 = 64 * 1024;

/// `store.json`: fixed at creation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoreConfig {
    pub magic: String,
    pub format: u32,
    /// Absolute path of the read-only base directory.
    pub base: PathBuf,
    pub block_size: u64,
}

/// A named checkpoint: the sealed layer that is the top of its view.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    pub name: String,
    pub layer: u32,
    /// Seconds since the epoch.
    pub created: u64,
}

/// The stack: which layers make up the view, and the checkpoints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stack {
    /// Layer ids, bottom first; the last one is the writable top.
    pub layers: Vec<u32>,
    pub next_layer: u32,
    pub checkpoints: Vec<Checkpoint>,
}

impl Stack {
    /// A fresh store: one empty writable layer.
    pub fn initial() -> Stack {
        Stack {
            layers: vec![1],
            next_layer: 2,
            checkpoints: Vec::new(),
        }
    }

    /// The stack after sealing the top layer as checkpoint `name` and
    /// opening a new top layer.
    pub fn with_checkpoint(&self, name: &str) -> Result<Stack> {
        check_name(name)?;
        if self.checkpoints.iter().any(|c| c.name == name) {
            return Err(Error::Conflict(format!(
                "checkpoint {name:?} already exists; pick another name or delete it first"
            )));
        }
        let mut next = self.clone();
        next.checkpoints.push(Checkpoint {
            name: name.to_owned(),
            layer: self.top(),
            created: now_secs(),
        });
        next.layers.push(self.next_layer);
        next.next_layer += 1;
        Ok(next)
    }

    /// The stack after rolling back to checkpoint `name`, and the layers it
    /// drops. Checkpoints taken after `name` go with their layers.
    pub fn rolled_back(&self, name: &str) -> Result<(Stack, Vec<u32>)> {
        let cp = self.find(name)?.clone();
        let pos = self
            .layers
            .iter()
            .position(|&l| l == cp.layer)
            .ok_or_else(|| {
                Error::BadStore(format!(
                    "checkpoint {name:?} refers to missing layer {}; run `umlctl fs fsck`",
                    cp.layer
                ))
            })?;
        let mut next = self.clone();
        let dropped = next.layers.split_off(pos + 1);
        next.layers.push(self.next_layer);
        next.next_layer += 1;
        // Merged layers take new ids, so ids do not grow up the stack.
        let kept = &next.layers;
        next.checkpoints.retain(|c| kept.contains(&c.layer));
        Ok((next, dropped))
    }

    /// The stack without checkpoint `name` (its layers stay).
    pub fn without_checkpoint(&self, name: &str) -> Result<Stack> {
        self.find(name)?;
        let mut next = self.clone();
        next.checkpoints.retain(|c| c.name != name);
        Ok(next)
    }

    pub fn top(&self) -> u32 {
        *self.layers.last().expect("a stack always has a top layer")
    }
    pub fn find(&self, name: &str) -> Result<&Checkpoint> {
        self.checkpoints
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "checkpoint {name:?} does not exist (see `umlctl fs list`)"
                ))
            })
    }
}

/// Paths inside one store directory.
#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn config(&self) -> PathBuf {
        self.dir.join("store.json")
    }
    pub fn stack(&self) -> PathBuf {
        self.dir.join("stack")
    }
    pub fn layers(&self) -> PathBuf {
        self.dir.join("layers")
    }
    pub fn layer(&self, id: u32) -> PathBuf {
        self.layers().join(format!("{id:08}"))
    }
    pub fn journal(&self, id: u32) -> PathBuf {
        self.layer(id).join("journal")
    }
    pub fn wal(&self, id: u32) -> PathBuf {
        self.layer(id).join("wal")
    }
    pub fn data_dir(&self, id: u32) -> PathBuf {
        self.layer(id).join("data")
    }
    pub fn data(&self, id: u32, ino: u64) -> PathBuf {
        self.data_dir(id).join(ino.to_string())
    }
    pub fn trash(&self) -> PathBuf {
        self.dir.join("trash")
    }
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    pub fn read_config(&self) -> Result<StoreConfig> {
        let path = self.config();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "{} is not a cowfs store (no store.json); create one with `umlctl fs create`",
                    self.dir.display()
                )))
            }
            Err(e) => return Err(e).at("read", &path),
        };
        let cfg: StoreConfig = serde_json::from_slice(&text)
            .map_err(|e| Error::BadStore(format!("{} is corrupt: {e}", path.display())))?;
        if cfg.magic != MAGIC {
            return Err(Error::BadStore(format!(
                "{} is not a cowfs store config (bad magic)",
                path.display()
            )));
        }
        if cfg.format > FORMAT_VERSION {
            return Err(Error::BadStore(format!(
                "store {} has format {} but this cowfs reads up to {FORMAT_VERSION}; upgrade umlctl",
                self.dir.display(),
                cfg.format
            )));
        }
        Ok(cfg)
    }

    /// Mark an older store as this format (before it is written to in
    /// ways older versions would misread).
    pub fn upgrade_format(&self, cfg: &StoreConfig) -> Result<()> {
        if cfg.format >= FORMAT_VERSION {
            return Ok(());
        }
        let cfg = StoreConfig {
            format: FORMAT_VERSION,
            ..cfg.clone()
        };
        write_atomic(
            &self.config(),
            &serde_json::to_vec_pretty(&cfg).expect("serializable"),
        )
    }

    /// The stack as last committed. Stores made before the `stack` commit
    /// file have only `stack.json`.
    pub fn read_stack(&self) -> Result<Stack> {
        let stack = if commit::exists(&self.stack()) {
            commit::read(&self.stack())?
        } else {
            self.read_old_stack()?
        };
        if stack.layers.is_empty() {
            return Err(Error::BadStore(format!(
                "{} lists no layers",
                self.stack().display()
            )));
        }
        Ok(stack)
    }

    fn read_old_stack(&self) -> Result<Stack> {
        let path = self.dir.join("stack.json");
        let text = fs::read(&path).at("read", &path)?;
        serde_json::from_slice(&text).map_err(|e| {
            Error::BadStore(format!(
                "{} is corrupt: {e}; run `umlctl fs fsck`",
                path.display()
            ))
        })
    }

    /// The commit point of checkpoint, rollback, delete and merge.
    pub fn write_stack(&self, stack: &Stack) -> Result<()> {
        self.commit_stack(&mut commit::Committer::open(&self.stack())?, stack)
    }

    /// `write_stack` through the committer a mounted store holds.
    pub fn commit_stack(&self, committer: &mut commit::Committer, stack: &Stack) -> Result<()> {
        committer.commit(stack)?;
        let old = self.dir.join("stack.json");
        if old.exists() {
            fs::remove_file(&old).at("remove", &old)?;
        }
        Ok(())
    }

    /// Make an empty layer directory (removing a leftover of a crash first).
    pub fn make_layer(&self, id: u32) -> Result<()> {
        let dir = self.layer(id);
        if dir.exists() {
            fs::remove_dir_all(&dir).at("remove leftover layer", &dir)?;
        }
        // Built under another name and renamed, so that it appears whole.
        let new = dir.with_extension("new");
        if new.exists() {
            fs::remove_dir_all(&new).at("remove leftover layer", &new)?;
        }
        mkdir(&new)?;
        mkdir(&new.join("data"))?;
        create_file(&new.join("journal"))?;
        sync_dir(&new)?;
        fs::rename(&new, &dir).at("rename into place", &new)?;
        sync_dir(&self.layers())
    }

    /// Whether layer `id` exists and holds nothing (a spare made ahead).
    pub fn is_empty_layer(&self, id: u32) -> bool {
        let empty_dir = |p: PathBuf| fs::read_dir(p).is_ok_and(|mut d| d.next().is_none());
        fs::metadata(self.journal(id)).is_ok_and(|m| m.len() == 0) && empty_dir(self.data_dir(id))
    }

    /// Make layer `id` unless an empty one is already there.
    pub fn ensure_layer(&self, id: u32) -> Result<()> {
        if self.is_empty_layer(id) {
            Ok(())
        } else {
            self.make_layer(id)
        }
    }

    /// Move a dropped layer into the trash (O(1)); `empty_trash` deletes it.
    pub fn trash_layer(&self, id: u32) -> Result<()> {
        let from = self.layer(id);
        if !from.exists() {
            return Ok(());
        }
        let to = self.trash().join(format!("{id:08}-{}", std::process::id()));
        fs::rename(&from, &to).at("move to trash", &from)
    }

    /// Move to the trash the layer directories `stack` does not list (a
    /// rollback commits before it moves its dropped layers away), keeping
    /// the spare. Only while nothing else works on the store.
    pub fn trash_unlisted(&self, stack: &Stack) -> Result<()> {
        for e in fs::read_dir(self.layers())
            .at("read", &self.layers())?
            .flatten()
        {
            let id = e.file_name().to_string_lossy().parse::<u32>();
            if let Ok(id) = id {
                if id < stack.next_layer && !stack.layers.contains(&id) {
                    self.trash_layer(id)?;
                }
            }
        }
        Ok(())
    }

    pub fn empty_trash(&self) {
        if let Ok(entries) = fs::read_dir(self.trash()) {
            for e in entries.flatten() {
                if let Err(err) = fs::remove_dir_all(e.path()) {
                    tracing::warn!("cannot delete {}: {err}", e.path().display());
                }
            }
        }
    }
}

/// Checkpoint names become file-system-safe identifiers in tools that use
/// them, so keep them simple.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "bad checkpoint name {name:?}: use 1-64 letters, digits, '.', '_' or '-'"
        )))
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn mkdir(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .at("create directory", path)
}

pub fn create_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .at("create", path)
}

pub fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .at("fsync directory", path)
}

/// Replace `path` with `bytes` so that a crash leaves either the old or the
/// new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = create_file(&tmp)?;
    f.write_all(bytes).at("write", &tmp)?;
    f.sync_all().at("fsync", &tmp)?;
    fs::rename(&tmp, path).at("rename into place", path)?;
    sync_dir(path.parent().expect("store files have a parent"))
}
