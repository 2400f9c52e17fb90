//! cowfs: a FUSE copy-on-write image layer. A store gives a writable view
//! of a read-only base directory tree (which may hold raw disk images):
//! files are copied up by block, so a 4 KiB write into a 10 GiB image
//! stores one block; checkpoint and rollback are O(1) in the data size.
//!
//! # Library API
//! ```no_run
//! use cowfs::{MountOptions, Store};
//! use std::path::Path;
//! # fn main() -> cowfs::Result<()> {
//! let store = Store::create(Path::new("/var/lib/vm1"), Path::new("/srv/images"), None)?;
//! let mount = store.mount(Path::new("/mnt/vm1"), &MountOptions::default())?;
//! // ... the VM writes /mnt/vm1/disk.img ...
//! store.checkpoint("before-upgrade")?;
//! // ... the upgrade writes more ...
//! store.rollback("before-upgrade")?; // the view is back, kernel caches invalidated
//! for cp in store.list()? { println!("{} (layer {})", cp.name, cp.layer); }
//! let changes = store.diff("before-upgrade", None)?;
//! drop(mount); // unmounts and makes everything durable
//! # let _ = changes; Ok(()) }
//! ```
//! `Store::open` reopens a store; every operation works whether the store is
//! mounted by this process, by another (`umlctl fs mount`: the call goes to
//! that daemon's control socket), or not at all. `Store::serve` runs a
//! mount in the calling thread (the daemon). `Store::fsck` checks and
//! repairs an unmounted store after a crash.
//!
//! # Module map
//! - `store`: the public `Store` handle (create, open, mount, checkpoints)
//! - `disk`: the on-disk layout, `store.json`, atomic writes
//! - `commit`: the `stack` file, committed with one fdatasync
//! - `journal`: per-layer metadata records, checksummed, torn tails detected
//! - `wal`: the fsync log of the top layer: a small fsync costs one flush
//! - `state`: in-memory metadata of a view (persistent maps: O(1) clones)
//! - `base`: the read-only base tree, read lazily and cached; a directory
//!   is read ahead at its first lookup, on another thread
//! - `tree`: reading a view (the merge of a state over the base)
//! - `data`: which layer each block of a file comes from; data file I/O
//! - `view`: the live view: every file system operation, checkpoint, rollback
//! - `fuse`: the FUSE adapter (fuser) over `view`; requests come by FUSE
//!   over io_uring where the kernel offers it (`Transport`), a transport
//!   added to the copy of fuser in third_party/fuser
//! - `passthrough`: the opt-in mode where the kernel reads unchanged base
//!   files directly, and the bookkeeping of open modes it needs
//! - `mount`: mounting, the store lock, the `Mount` handle
//! - `control`: the control socket of a mounted store
//! - `merge`: merging layers no checkpoint separates, in the background
//! - `background`: the threads behind that and other deferred work, ended
//!   at unmount
//! - `diff`, `fsck`: comparing checkpoints, checking and repairing
//! - `sys`: small wrappers over libc calls std and nix lack

mod background;
mod base;
mod commit;
mod control;
mod data;
mod diff;
mod disk;
mod error;
mod fsck;
mod fuse;
mod journal;
mod merge;
mod mount;
mod passthrough;
mod state;
mod store;
mod sys;
mod tree;
mod view;
mod wal;

pub use diff::{Change, ChangeKind};
pub use disk::{Checkpoint, DEFAULT_BLOCK_SIZE, FORMAT_VERSION};
pub use error::{Error, Result};
pub use fsck::FsckReport;
pub use mount::{
    is_mountpoint, unmount, Mount, MountOptions, Transport, DEFAULT_RING_THREADS, DEFAULT_THREADS,
};
pub use store::Store;
