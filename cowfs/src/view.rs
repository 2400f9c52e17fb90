//! `View`: the live, writable view of a store, the state behind a mount.
//! Its methods are the file system operations in plain terms (inode numbers,
//! names, errno on failure); `fuse` adapts them to the kernel protocol.
//!
//! Locking: one RwLock over the metadata, the top journal and the stack.
//! Reads plan under the read lock and do their I/O after releasing it;
//! mutations hold the write lock.

use crate::background::Background;
use crate::base::{Base, BaseInode, CAPABILITY};
use crate::commit::Committer;
use crate::data::{self, Seg};
use crate::disk::{Layout, Stack, StoreConfig};
use crate::error::{Context, Error, Result};
use crate::journal::{self, Record, Writer};
use crate::state::{self, Ino, Kind, Loc, Meta, Node, State, Ts, INLINE_MAX};
use crate::tree::Tree;
use crate::wal::{self, Wal};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard};

pub use crate::tree::{Attr, Errno, Res};

/// The fields a setattr changes.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Ts>,
    pub mtime: Option<Ts>,
    pub ctime: Option<Ts>,
}

/// Who writes, truncates or chowns a file, as far as the kernel's rules
/// for clearing setuid and setgid need to know. The default is the safe
/// side: no privilege, in no group.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    /// Holds CAP_FSETID, which keeps setuid and setgid on write and
    /// truncate.
    pub fsetid: bool,
    /// Its file system gid and supplementary groups.
    pub groups: Vec<u32>,
}

/// An inode a rollback changed that exists after it, as the kernel's
/// cache of it needs to know.
#[derive(Clone, Copy, Debug)]
pub struct Changed {
    pub ino: Ino,
    /// A regular file (its cached pages and size matter).
    pub file: bool,
    /// Open by some process at the rollback.
    pub open: bool,
    /// Its size after the rollback.
    pub size: u64,
    /// Bigger after the rollback than before it.
    pub grew: bool,
}

/// Who creates a node, and what.
#[derive(Clone, Copy, Debug)]
pub struct NewNode {
    pub kind: Kind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

pub struct View {
    pub layout: Layout,
    pub base: Base,
    pub block_size: u64,
    inner: RwLock<Inner>,
    /// Open data files, by (layer, inode).
    files: Mutex<HashMap<(u32, Ino), Arc<File>>>,
    /// Held while the next layer directory is made ahead of time, so that
    /// a checkpoint or rollback finds it ready; holds the highest layer id
    /// taken so far, so that a spare made late is not made for an id
    /// already used (and maybe dropped since).
    spare: Arc<Mutex<u32>>,
    /// Layers merged into another one: block maps still name the old ids.
    alias: RwLock<HashMap<u32, u32>>,
    /// Held by the one merger at work: two merging the same pair would
    /// build in the same directory and commit each other's half-built one.
    pub(crate) merging: Mutex<()>,
    /// Threads working off the caller's clock, ended at unmount.
    pub(crate) background: Background,
}

struct Inner {
    state: State,
    stack: Stack,
    journal: Writer,
    /// The fsync log of the top layer.
    wal: Wal,
    /// Blocks of the top layer written since the last sync of either kind:
    /// what a logged fsync puts into the log.
    dirty_blocks: BTreeSet<(Ino, u64)>,
    /// A change since the last full sync that the log cannot replay (too
    /// many blocks, a data file cut or punched): the next fsync is full.
    unloggable: bool,
    /// Inodes whose metadata changed since their last Node record.
    dirty: HashSet<Ino>,
    /// The state at each checkpointed layer, for O(1) rollback.
    snapshots: HashMap<u32, State>,
    /// Open file counts, so that an unlinked open file lives until closed.
    open: HashMap<Ino, u32>,
    /// Files of the top layer written since their data was last fsynced,
    /// with the `writes` count at their last write.
    unsynced: HashMap<Ino, u64>,
    /// Writes so far: tells a sync whether a file was written again after
    /// it synced the file's data without the lock.
    writes: u64,
    /// Inodes changed in each layer: what a rollback must invalidate.
    touched: HashMap<u32, HashSet<Ino>>,
    /// The store's commit file (`stack`).
    committer: Committer,
}

/// Past this many unsynced files one syncfs is cheaper than fsyncing each.
const SYNCFS_AT: usize = 64;

/// Writes at least this big are sent to disk at once (not waited for). The
/// kernel would keep them dirty until its threshold (gigabytes here), so a
/// big write + fsync would first pass all its data through FUSE and only
/// then write it to disk; started at once, the disk works while FUSE still
/// transfers, and fsync finds little left to do (1 GiB + fsync: 0.9-1.1 s
/// instead of 1.3-1.4 s). Small writes are left alone: they are random
/// more often than not, and the kernel batches them better at fsync.
const WRITEBACK_AT: usize = 256 << 10;

const NAME_MAX: usize = 255;

/// Bytes `off..end` of a file whose data is `data` followed by zeros.
fn read_inline(data: &[u8], off: u64, end: u64) -> Vec<u8> {
    if end <= off {
        return Vec::new();
    }
    let mut buf = vec![0u8; (end - off) as usize];
    let have = (data.len() as u64).clamp(off, end);
    buf[..(have - off) as usize].copy_from_slice(&data[off as usize..have as usize]);
    buf
}

/// Before a block new to the top layer is partly written: make the rest of
/// its range in the data file read as zero. The file normally has nothing
/// there, but after a crash it can: the data of an inode whose records the
/// crash lost (its number is handed out again) or of a lost copy-up. Only
/// checked where the file reaches that far, so appending costs nothing.
fn clear_stale(file: &File, start: u64, bs: u64) -> std::io::Result<()> {
    if file.metadata()?.len() > start {
        data::punch_hole(file, start, bs)?;
    }
    Ok(())
}

/// Clear setuid, and setgid where the kernel would (its
/// `setattr_should_drop_sgid`): always with group execute; without it only
/// for a caller neither in the file's group nor holding CAP_FSETID. Called
/// at a write or truncate by a caller without CAP_FSETID, and at any chown.
fn kill_suidgid(meta: &mut Meta, caller: &Caller) {
    let outsider = !caller.fsetid && !caller.groups.contains(&meta.gid);
    meta.perm &= !libc::S_ISUID;
    if meta.perm & libc::S_IXGRP != 0 || outsider {
        meta.perm &= !libc::S_ISGID;
    }
}

impl View {
    /// Load a store: replay every layer's journal over the base.
    pub fn load(layout: Layout, cfg: &StoreConfig) -> Result<View> {
        let base = Base::open(&cfg.base).map_err(|e| {
            Error::NotFound(format!(
                "base directory {} of store {} is not readable: {e}",
                cfg.base.display(),
                layout.dir.display()
            ))
        })?;
        let stack = layout.read_stack()?;
        layout.trash_unlisted(&stack)?;
        layout.upgrade_format(cfg)?;
        wal::recover(&layout, stack.top())?;
        let (state, snapshots) = replay(&layout, &stack, cfg.block_size, true)?;
        let touched = touched_by_layer(&layout, &stack)?;
        let journal = Writer::open(&layout.journal(stack.top()))?;
        let wal = Wal::open(&layout.wal(stack.top()))?;
        let committer = Committer::open(&layout.stack())?;
        let view = View {
            layout,
            base,
            block_size: cfg.block_size,
            inner: RwLock::new(Inner {
                state,
                stack,
                journal,
                wal,
                dirty_blocks: BTreeSet::new(),
                unloggable: false,
                dirty: HashSet::new(),
                snapshots,
                open: HashMap::new(),
                unsynced: HashMap::new(),
                writes: 0,
                touched,
                committer,
            }),
            files: Mutex::default(),
            spare: Arc::default(),
            alias: RwLock::default(),
            merging: Mutex::default(),
            background: Background::default(),
        };
        view.prepare_spare();
        view.drop_orphans().map_err(|e| Error::Io {
            context: "drop orphan inodes".into(),
            source: std::io::Error::from_raw_os_error(e),
        })?;
        Ok(view)
    }

    /// Inodes left with no link by a crash while they were open.
    fn drop_orphans(&self) -> Res<()> {
        let mut g = self.lock();
        let orphans: Vec<Ino> = g
            .state
            .nodes
            .iter()
            .filter(|(_, n)| n.meta.nlink == 0)
            .map(|(i, _)| *i)
            .collect();
        for ino in orphans {
            self.drop_node(&mut g, ino)?;
        }
        Ok(())
    }

    /// The write lock, after a sync if the journal buffer is full (the
    /// records may reach the file only after the data they name). A failed
    /// sync keeps the records buffered: the next fsync reports the error.
    fn lock(&self) -> RwLockWriteGuard<'_, Inner> {
        let mut g = self.inner.write().unwrap();
        if g.journal.full() {
            if let Err(e) = self.sync_locked(&mut g) {
                tracing::error!("sync with a full journal buffer: {e}");
            }
        }
        g
    }

    // ---- reading metadata ----

    fn base_inode(&self, ino: Ino) -> Res<BaseInode> {
        self.base.inode(ino).ok_or(libc::ESTALE)
    }

    /// The base file behind `ino` if no layer has changed it (not even its
    /// metadata): what a passthrough open can read directly.
    pub fn unchanged_base_file(&self, ino: Ino) -> Option<Arc<File>> {
        if self.inner.read().unwrap().state.nodes.contains_key(&ino) {
            return None;
        }
        let b = self.base.inode(ino)?;
        if b.meta.kind != Kind::File {
            return None;
        }
        self.base.file(ino, &b.origin).ok()
    }

    fn tree<'a>(&'a self, state: &'a State) -> Tree<'a> {
        Tree {
            base: &self.base,
            state,
            block_size: self.block_size,
        }
    }

    fn attr_in(&self, st: &State, ino: Ino) -> Res<Attr> {
        self.tree(st).attr(ino)
    }

    fn child_in(&self, st: &State, dir: Ino, name: &OsStr) -> Res<Option<Ino>> {
        self.tree(st).child(dir, name)
    }

    fn list_in(&self, st: &State, dir: Ino) -> Res<Vec<(OsString, Ino, Kind)>> {
        self.tree(st).list(dir)
    }

    pub fn attr(&self, ino: Ino) -> Res<Attr> {
        self.attr_in(&self.inner.read().unwrap().state, ino)
    }

    pub fn lookup(&self, dir: Ino, name: &OsStr) -> Res<Attr> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        let g = self.inner.read().unwrap();
        let ino = self.child_in(&g.state, dir, name)?.ok_or(libc::ENOENT)?;
        self.attr_in(&g.state, ino)
    }

    /// The entries of a directory (without "." and "..").
    pub fn list(&self, dir: Ino) -> Res<Vec<(OsString, Ino, Kind)>> {
        self.list_in(&self.inner.read().unwrap().state, dir)
    }

    pub fn readlink(&self, ino: Ino) -> Res<Vec<u8>> {
        let g = self.inner.read().unwrap();
        let origin = match g.state.nodes.get(&ino) {
            Some(n) if n.meta.kind != Kind::Symlink => return Err(libc::EINVAL),
            Some(n) => match (&n.symlink, &n.origin) {
                (Some(t), _) => return Ok(t.clone()),
                (None, Some(o)) => o.clone(),
                (None, None) => return Err(libc::EIO),
            },
            None => self.base_inode(ino)?.origin,
        };
        std::fs::read_link(self.base.path(&origin))
            .map(|p| p.into_os_string().into_vec())
            .map_err(errno)
    }

    // ---- changing metadata ----

    /// The node of `ino` in the state, taken over from the base first if
    /// this is its first change.
    fn node_mut<'a>(&self, g: &'a mut Inner, ino: Ino) -> Res<&'a mut Node> {
        if !g.state.nodes.contains_key(&ino) {
            let b = self.base_inode(ino)?;
            let node = Node::new(b.meta, Some(b.origin), b.meta.size);
            g.journal.append(&node.record(ino)).map_err(eio)?;
            g.state.nodes.insert(ino, node);
        }
        g.dirty.insert(ino);
        let top = g.stack.top();
        g.touched.entry(top).or_default().insert(ino);
        Ok(g.state.nodes.get_mut(&ino).expect("just inserted"))
    }

    fn set_entry(&self, g: &mut Inner, dir: Ino, name: &OsStr, ino: Option<Ino>) -> Res<()> {
        let now = Ts::now();
        let d = self.node_mut(g, dir)?;
        state::set_entry(d, name.to_owned(), ino);
        d.meta.mtime = now;
        d.meta.ctime = now;
        g.journal
            .append(&Record::Entry {
                dir,
                name: name.as_bytes().to_vec(),
                ino,
            })
            .map_err(eio)
    }

    fn add_nlink(&self, g: &mut Inner, ino: Ino, delta: i32) -> Res<()> {
        let n = self.node_mut(g, ino)?;
        n.meta.nlink = n.meta.nlink.saturating_add_signed(delta);
        if delta != 0 {
            n.meta.ctime = Ts::now();
        }
        Ok(())
    }

    /// Create a node named `name` in `dir`.
    pub fn create(
        &self,
        dir: Ino,
        name: &OsStr,
        new: NewNode,
        symlink: Option<&[u8]>,
    ) -> Res<Attr> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        let mut g = self.lock();
        if self.child_in(&g.state, dir, name)?.is_some() {
            return Err(libc::EEXIST);
        }
        let parent = self.attr_in(&g.state, dir)?.meta;
        let now = Ts::now();
        let mut perm = new.perm & 0o7777;
        let mut gid = new.gid;
        if parent.perm & libc::S_ISGID != 0 {
            gid = parent.gid;
            if new.kind == Kind::Dir {
                perm |= libc::S_ISGID;
            }
        }
        let meta = Meta {
            kind: new.kind,
            perm,
            uid: new.uid,
            gid,
            nlink: if new.kind == Kind::Dir { 2 } else { 1 },
            size: symlink.map_or(0, |t| t.len() as u64),
            rdev: new.rdev,
            atime: now,
            mtime: now,
            ctime: now,
        };
        let ino = g.state.alloc_ino();
        let mut node = Node::new(meta, None, 0);
        g.journal.append(&node.record(ino)).map_err(eio)?;
        if let Some(t) = symlink {
            node.symlink = Some(t.to_vec());
            g.journal
                .append(&Record::Symlink {
                    ino,
                    target: t.to_vec(),
                })
                .map_err(eio)?;
        }
        g.state.nodes.insert(ino, node);
        self.set_entry(&mut g, dir, name, Some(ino))?;
        if new.kind == Kind::Dir {
            self.add_nlink(&mut g, dir, 1)?;
        }
        self.attr_in(&g.state, ino)
    }

    pub fn link(&self, ino: Ino, dir: Ino, name: &OsStr) -> Res<Attr> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        let mut g = self.lock();
        if self.child_in(&g.state, dir, name)?.is_some() {
            return Err(libc::EEXIST);
        }
        if self.attr_in(&g.state, ino)?.meta.kind == Kind::Dir {
            return Err(libc::EPERM);
        }
        self.add_nlink(&mut g, ino, 1)?;
        self.set_entry(&mut g, dir, name, Some(ino))?;
        self.attr_in(&g.state, ino)
    }

    fn is_empty_dir(&self, st: &State, ino: Ino) -> Res<bool> {
        Ok(self.list_in(st, ino)?.is_empty())
    }

    /// Remove the name `name` from `dir`; `want_dir` is rmdir.
    pub fn remove(&self, dir: Ino, name: &OsStr, want_dir: bool) -> Res<()> {
        let mut g = self.lock();
        let ino = self.child_in(&g.state, dir, name)?.ok_or(libc::ENOENT)?;
        let kind = self.attr_in(&g.state, ino)?.meta.kind;
        match (want_dir, kind == Kind::Dir) {
            (true, false) => return Err(libc::ENOTDIR),
            (false, true) => return Err(libc::EISDIR),
            (true, true) if !self.is_empty_dir(&g.state, ino)? => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        self.set_entry(&mut g, dir, name, None)?;
        self.unlinked(&mut g, ino, dir)
    }

    /// One name of `ino` (in `dir`) is gone: fix link counts, drop the inode
    /// once nothing refers to it.
    fn unlinked(&self, g: &mut Inner, ino: Ino, dir: Ino) -> Res<()> {
        let is_dir = self.attr_in(&g.state, ino)?.meta.kind == Kind::Dir;
        if is_dir {
            self.add_nlink(g, dir, -1)?;
            self.node_mut(g, ino)?.meta.nlink = 0;
        } else {
            self.add_nlink(g, ino, -1)?;
        }
        let n = self.node_mut(g, ino)?;
        n.meta.ctime = Ts::now();
        if n.meta.nlink == 0 && g.open.get(&ino).copied().unwrap_or(0) == 0 {
            self.drop_node(g, ino)?;
        }
        Ok(())
    }

    fn drop_node(&self, g: &mut Inner, ino: Ino) -> Res<()> {
        g.state.nodes.remove(&ino);
        g.dirty.remove(&ino);
        g.journal.append(&Record::Drop { ino }).map_err(eio)?;
        let top = g.stack.top();
        self.files.lock().unwrap().remove(&(top, ino));
        let _ = std::fs::remove_file(self.layout.data(top, ino));
        Ok(())
    }

    pub fn rename(
        &self,
        dir: Ino,
        name: &OsStr,
        newdir: Ino,
        newname: &OsStr,
        flags: u32,
    ) -> Res<()> {
        if newname.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        let mut g = self.lock();
        let src = self.child_in(&g.state, dir, name)?.ok_or(libc::ENOENT)?;
        let dst = self.child_in(&g.state, newdir, newname)?;
        let src_dir = self.attr_in(&g.state, src)?.meta.kind == Kind::Dir;
        if flags & libc::RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(libc::ENOENT)?;
            let dst_dir = self.attr_in(&g.state, dst)?.meta.kind == Kind::Dir;
            self.set_entry(&mut g, dir, name, Some(dst))?;
            self.set_entry(&mut g, newdir, newname, Some(src))?;
            if dir != newdir && src_dir != dst_dir {
                let d = if src_dir { 1 } else { -1 };
                self.add_nlink(&mut g, newdir, d)?;
                self.add_nlink(&mut g, dir, -d)?;
            }
            self.add_nlink(&mut g, src, 0)?;
            self.add_nlink(&mut g, dst, 0)?;
            self.touch_ctime(&mut g, &[src, dst])?;
            return Ok(());
        }
        if let Some(dst) = dst {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(libc::EEXIST);
            }
            if dst == src {
                return Ok(());
            }
            let dst_dir = self.attr_in(&g.state, dst)?.meta.kind == Kind::Dir;
            match (src_dir, dst_dir) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !self.is_empty_dir(&g.state, dst)? => return Err(libc::ENOTEMPTY),
                _ => {}
            }
            self.set_entry(&mut g, newdir, newname, None)?;
            self.unlinked(&mut g, dst, newdir)?;
        }
        self.set_entry(&mut g, dir, name, None)?;
        self.set_entry(&mut g, newdir, newname, Some(src))?;
        if src_dir && dir != newdir {
            self.add_nlink(&mut g, dir, -1)?;
            self.add_nlink(&mut g, newdir, 1)?;
        }
        self.touch_ctime(&mut g, &[src])
    }

    fn touch_ctime(&self, g: &mut Inner, inos: &[Ino]) -> Res<()> {
        let now = Ts::now();
        for &ino in inos {
            self.node_mut(g, ino)?.meta.ctime = now;
        }
        Ok(())
    }

    /// Change the attributes in `set`, at the request of `caller` (whose
    /// privileges matter only for a size or owner change).
    pub fn setattr(&self, ino: Ino, set: SetAttr, caller: &Caller) -> Res<Attr> {
        let mut g = self.lock();
        let now = Ts::now();
        let kind = self.attr_in(&g.state, ino)?.meta.kind;
        // chown(2) of anything but a directory clears setuid, setgid (with
        // group execute) and capabilities, even for root.
        let chown = (set.uid.is_some() || set.gid.is_some()) && kind != Kind::Dir;
        if set.size.is_some() && kind != Kind::File {
            return Err(libc::EINVAL);
        }
        if set.size.is_some() || chown {
            self.drop_capability(&mut g, ino)?;
        }
        if let Some(size) = set.size {
            self.set_size(&mut g, ino, size)?;
            let n = self.node_mut(&mut g, ino)?;
            n.meta.mtime = now;
            n.meta.ctime = now;
        }
        let n = self.node_mut(&mut g, ino)?;
        if let Some(mode) = set.mode {
            n.meta.perm = mode & 0o7777;
        }
        // Before the owner changes: the kernel decides on the old group.
        if chown || (set.size.is_some() && !caller.fsetid) {
            kill_suidgid(&mut n.meta, caller);
        }
        if let Some(uid) = set.uid {
            n.meta.uid = uid;
        }
        if let Some(gid) = set.gid {
            n.meta.gid = gid;
        }
        if let Some(t) = set.atime {
            n.meta.atime = t;
        }
        if let Some(t) = set.mtime {
            n.meta.mtime = t;
        }
        n.meta.ctime = set.ctime.unwrap_or(now);
        self.attr_in(&g.state, ino)
    }

    /// Remove the security.capability xattr of `ino` if it has one: this
    /// file system's part of FUSE_HANDLE_KILLPRIV_V2 at each write,
    /// truncate and chown. The kernel stops looking once it has marked an
    /// inode S_NOSEC, so it cannot be left to the kernel.
    fn drop_capability(&self, g: &mut Inner, ino: Ino) -> Res<()> {
        let has = match g.state.nodes.get(&ino) {
            Some(Node {
                xattrs: Some(x), ..
            }) => x.contains_key(CAPABILITY),
            Some(Node {
                origin: Some(o), ..
            }) => self.base.has_capability(ino, o),
            Some(_) => false,
            None => self.base.has_capability(ino, &self.base_inode(ino)?.origin),
        };
        if has {
            self.setxattr_locked(g, ino, CAPABILITY, None, 0)?;
        }
        Ok(())
    }

    // ---- extended attributes ----

    fn xattrs_in(&self, st: &State, ino: Ino) -> Res<imbl::OrdMap<Vec<u8>, Vec<u8>>> {
        let origin = match st.nodes.get(&ino) {
            Some(n) => match (&n.xattrs, &n.origin) {
                (Some(x), _) => return Ok(x.clone()),
                (None, Some(o)) => o.clone(),
                (None, None) => return Ok(imbl::OrdMap::new()),
            },
            None => self.base_inode(ino)?.origin,
        };
        let path = self.base.path(&origin);
        let mut out = imbl::OrdMap::new();
        for name in crate::sys::list_xattrs(&path).map_err(errno)? {
            if let Ok(v) = crate::sys::get_xattr(&path, &name) {
                out.insert(name, v);
            }
        }
        Ok(out)
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Res<Vec<u8>> {
        let g = self.inner.read().unwrap();
        self.xattrs_in(&g.state, ino)?
            .get(name)
            .cloned()
            .ok_or(libc::ENODATA)
    }

    pub fn listxattr(&self, ino: Ino) -> Res<Vec<u8>> {
        let g = self.inner.read().unwrap();
        let mut out = Vec::new();
        for name in self.xattrs_in(&g.state, ino)?.keys() {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    /// Set (`Some`) or remove (`None`) an extended attribute; `flags` are
    /// XATTR_CREATE / XATTR_REPLACE.
    pub fn setxattr(&self, ino: Ino, name: &[u8], value: Option<&[u8]>, flags: i32) -> Res<()> {
        self.setxattr_locked(&mut self.lock(), ino, name, value, flags)
    }

    fn setxattr_locked(
        &self,
        g: &mut Inner,
        ino: Ino,
        name: &[u8],
        value: Option<&[u8]>,
        flags: i32,
    ) -> Res<()> {
        let mut map = self.xattrs_in(&g.state, ino)?;
        let exists = map.contains_key(name);
        match value {
            Some(_) if flags & libc::XATTR_CREATE != 0 && exists => return Err(libc::EEXIST),
            Some(_) if flags & libc::XATTR_REPLACE != 0 && !exists => return Err(libc::ENODATA),
            None if !exists => return Err(libc::ENODATA),
            Some(v) => {
                map.insert(name.to_vec(), v.to_vec());
            }
            None => {
                map.remove(name);
            }
        }
        let rec = Record::Xattrs {
            ino,
            xattrs: map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        let n = self.node_mut(g, ino)?;
        n.xattrs = Some(map);
        n.meta.ctime = Ts::now();
        g.journal.append(&rec).map_err(eio)
    }

    // ---- file data ----

    /// An open data file of `ino` in `layer`, made if missing: for the top
    /// layer, which writes go to.
    fn layer_file(&self, layer: u32, ino: Ino) -> std::io::Result<Arc<File>> {
        self.data_file(layer, ino, true)
    }

    /// An open data file of `ino` in `layer`. `create`: only for the top
    /// layer. A file exists wherever a block map names its layer: one
    /// missing is damage, an error rather than zeros.
    fn data_file(&self, layer: u32, ino: Ino, create: bool) -> std::io::Result<Arc<File>> {
        // Held until the file is cached: a merge renames its layers away
        // only after it has pointed their ids elsewhere and dropped their
        // cached files.
        let alias = self.alias.read().unwrap();
        let layer = alias.get(&layer).copied().unwrap_or(layer);
        let mut files = self.files.lock().unwrap();
        if let Some(f) = files.get(&(layer, ino)) {
            return Ok(f.clone());
        }
        if files.len() > 2048 {
            files.clear();
        }
        let path = self.layout.data(layer, ino);
        let f = Arc::new(data::open_data_file(&path, create).inspect_err(|e| {
            tracing::error!("data file {}: {e}", path.display());
        })?);
        files.insert((layer, ino), f.clone());
        Ok(f)
    }

    fn source_file(
        &self,
        ino: Ino,
        origin: Option<&std::path::Path>,
        seg: &Seg,
    ) -> Res<Option<Arc<File>>> {
        match seg.loc {
            data::Src::Zero => Ok(None),
            // Blocks are mapped to a layer only once written to its file.
            data::Src::Layer(l) => self.data_file(l, ino, false).map(Some).map_err(errno),
            data::Src::Base => {
                let o = origin.ok_or(libc::EIO)?;
                self.base.file(ino, o).map(Some).map_err(errno)
            }
        }
    }

    /// Read `segs` (as planned by `data::plan`) into `buf`, which starts at
    /// file offset `start`.
    fn fill(
        &self,
        ino: Ino,
        origin: Option<&std::path::Path>,
        segs: &[Seg],
        start: u64,
        buf: &mut [u8],
    ) -> Res<()> {
        for seg in segs {
            if let Some(f) = self.source_file(ino, origin, seg)? {
                let a = (seg.start - start) as usize;
                let b = (seg.end - start) as usize;
                data::pread_full(&f, &mut buf[a..b], seg.start).map_err(errno)?;
            }
        }
        Ok(())
    }

    pub fn read(&self, ino: Ino, off: u64, size: u32) -> Res<Vec<u8>> {
        let (segs, origin, end) = {
            let g = self.inner.read().unwrap();
            match g.state.nodes.get(&ino) {
                Some(n) => {
                    if n.meta.kind != Kind::File {
                        return Err(libc::EINVAL);
                    }
                    let end = (off + size as u64).min(n.meta.size);
                    if let Some(data) = &n.inline {
                        return Ok(read_inline(data, off, end));
                    }
                    let segs = data::plan(n, off, end, self.block_size);
                    (segs, n.origin.clone(), end)
                }
                None => {
                    let b = self.base_inode(ino)?;
                    let end = (off + size as u64).min(b.meta.size);
                    let whole = vec![Seg {
                        start: off,
                        end: end.max(off),
                        loc: data::Src::Base,
                    }];
                    (whole, Some(b.origin), end)
                }
            }
        };
        if end <= off {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - off) as usize];
        self.fill(ino, origin.as_deref(), &segs, off, &mut buf)?;
        Ok(buf)
    }

    /// Write `bytes` at `off`. `kill`: the writer, who lacks CAP_FSETID
    /// (the kernel's FUSE_WRITE_KILL_SUIDGID), so setuid and setgid may go
    /// too.
    pub fn write(&self, ino: Ino, off: u64, bytes: &[u8], kill: Option<&Caller>) -> Res<u32> {
        let mut g = self.lock();
        if !self.write_inline(&mut g, ino, off, bytes)? {
            self.write_locked(&mut g, ino, off, bytes)?;
        }
        self.drop_capability(&mut g, ino)?;
        let writeback = if bytes.len() >= WRITEBACK_AT {
            self.layer_file(g.stack.top(), ino).ok()
        } else {
            None
        };
        let now = Ts::now();
        let n = self.node_mut(&mut g, ino)?;
        n.meta.size = n.meta.size.max(off + bytes.len() as u64);
        n.meta.mtime = now;
        n.meta.ctime = now;
        if let Some(caller) = kill {
            kill_suidgid(&mut n.meta, caller);
        }
        drop(g);
        if let Some(f) = writeback {
            // Only a head start: fsync still waits for everything.
            if let Err(e) = crate::sys::start_writeback(&f, off, bytes.len() as u64) {
                tracing::debug!("sync_file_range: {e}");
            }
        }
        Ok(bytes.len() as u32)
    }

    /// Write into the inline data of a small file made in a layer (see
    /// `Node::inline`). False when the file is not one, or the write would
    /// take it past `INLINE_MAX`: `write_locked` then moves its data to a
    /// data file.
    fn write_inline(&self, g: &mut Inner, ino: Ino, off: u64, bytes: &[u8]) -> Res<bool> {
        let end = off + bytes.len() as u64;
        let n = self.node_mut(g, ino)?;
        let small = n.meta.kind == Kind::File
            && n.origin.is_none()
            && n.blocks.is_empty()
            && end <= INLINE_MAX.min(self.block_size);
        if !small {
            return Ok(false);
        }
        let data = n.inline.get_or_insert_with(Vec::new);
        if data.len() < end as usize {
            data.resize(end as usize, 0);
        }
        data[off as usize..end as usize].copy_from_slice(bytes);
        Ok(true)
    }

    /// Write into the top layer, copying up the part of each touched block
    /// that the write does not cover (only when it holds data below).
    fn write_locked(&self, g: &mut Inner, ino: Ino, off: u64, bytes: &[u8]) -> Res<()> {
        if let Some(data) = self.node_mut(g, ino)?.inline.take() {
            // Outgrown: the inline data moves to the data file first.
            if !data.is_empty() {
                self.write_locked(g, ino, 0, &data)?;
            }
        }
        let top = g.stack.top();
        let bs = self.block_size;
        let node = self.node_mut(g, ino)?.clone();
        if node.meta.kind != Kind::File {
            return Err(libc::EINVAL);
        }
        let file = self.layer_file(top, ino).map_err(errno)?;
        g.writes += 1;
        let n = g.writes;
        g.unsynced.insert(ino, n);
        let end = off + bytes.len() as u64;
        let mut fresh = Vec::new();
        let mut b = off / bs;
        while b * bs < end {
            let (bstart, bend) = (b * bs, (b + 1) * bs);
            let (s, e) = (off.max(bstart), end.min(bend));
            let chunk = &bytes[(s - off) as usize..(e - off) as usize];
            let loc = node.blocks.get(&b).copied();
            let covers = s == bstart && (e == bend || e >= node.meta.size);
            let fresh_block = loc != Some(Loc::Layer(top));
            if !fresh_block || covers || !data::has_data_below(&node, b, bs) {
                if fresh_block && (s, e) != (bstart, bend) {
                    clear_stale(&file, bstart, bs).map_err(errno)?;
                }
                data::pwrite_all(&file, chunk, s).map_err(errno)?;
            } else {
                // Copy-up: the merged block, with the write laid over it.
                let valid = node.meta.size.min(bend).max(e);
                let mut block = vec![0u8; (valid - bstart) as usize];
                let segs = data::plan(&node, bstart, node.meta.size.min(bend), bs);
                self.fill(ino, node.origin.as_deref(), &segs, bstart, &mut block)?;
                block[(s - bstart) as usize..(e - bstart) as usize].copy_from_slice(chunk);
                if valid < bend {
                    clear_stale(&file, bstart, bs).map_err(errno)?;
                }
                data::pwrite_all(&file, &block, bstart).map_err(errno)?;
            }
            if loc != Some(Loc::Layer(top)) {
                fresh.push(b);
            }
            Self::note_dirty(g, ino, b, bs);
            b += 1;
        }
        self.mark_blocks(g, ino, &fresh, Loc::Layer(top))
    }

    /// Remember block `b` for the next logged fsync, or give up on logging
    /// when more blocks are dirty than a batch holds.
    fn note_dirty(g: &mut Inner, ino: Ino, b: u64, bs: u64) {
        if g.unloggable {
            return;
        }
        if (g.dirty_blocks.len() as u64 + 1) * bs > wal::BATCH_MAX {
            g.unloggable = true;
            g.dirty_blocks.clear();
        } else {
            g.dirty_blocks.insert((ino, b));
        }
    }

    /// Record that blocks now live at `loc`, in runs.
    fn mark_blocks(&self, g: &mut Inner, ino: Ino, blocks: &[u64], loc: Loc) -> Res<()> {
        let n = self.node_mut(g, ino)?;
        for &b in blocks {
            n.blocks.insert(b, loc);
        }
        for (first, count) in data::runs(blocks) {
            g.journal
                .append(&Record::Blocks {
                    ino,
                    first,
                    count,
                    zero: loc == Loc::Zero,
                })
                .map_err(eio)?;
        }
        Ok(())
    }

    fn set_size(&self, g: &mut Inner, ino: Ino, size: u64) -> Res<()> {
        let bs = self.block_size;
        let top = g.stack.top();
        let node = self.node_mut(g, ino)?.clone();
        if size < node.meta.size {
            // A partial last block held in a lower layer keeps bytes past
            // `size` there: copy its head up so that they read as zero later.
            let b = size / bs;
            if !size.is_multiple_of(bs) {
                if let Some(Loc::Layer(l)) = node.blocks.get(&b) {
                    if *l != top {
                        let mut head = vec![0u8; (size - b * bs) as usize];
                        let segs = data::plan(&node, b * bs, size, bs);
                        self.fill(ino, node.origin.as_deref(), &segs, b * bs, &mut head)?;
                        self.write_locked(g, ino, b * bs, &head)?;
                    }
                }
            }
            let n = self.node_mut(g, ino)?;
            state::truncate_blocks(n, size, bs);
            g.journal
                .append(&Record::Truncate { ino, size })
                .map_err(eio)?;
            if self.layout.data(top, ino).exists() {
                let f = self.layer_file(top, ino).map_err(errno)?;
                f.set_len(size).map_err(errno)?;
                g.unloggable = true;
            }
        }
        self.node_mut(g, ino)?.meta.size = size;
        Ok(())
    }

    /// fallocate(2): allocate (a no-op here beyond the size), punch a hole
    /// or zero a range.
    pub fn fallocate(&self, ino: Ino, off: u64, len: u64, mode: i32) -> Res<()> {
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if mode
            & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE)
            != 0
            || (punch && !keep)
        {
            return Err(libc::EOPNOTSUPP);
        }
        let mut g = self.lock();
        let size = self.attr_in(&g.state, ino)?.meta.size;
        if self.attr_in(&g.state, ino)?.meta.kind != Kind::File {
            return Err(libc::ENODEV);
        }
        let end = off + len;
        if punch || zero {
            self.zero_range(&mut g, ino, off, if keep { end.min(size) } else { end })?;
        }
        let now = Ts::now();
        let n = self.node_mut(&mut g, ino)?;
        if !keep && end > n.meta.size {
            n.meta.size = end;
        }
        if punch || zero || n.meta.size != size {
            n.meta.mtime = now;
            n.meta.ctime = now;
        }
        Ok(())
    }

    fn zero_range(&self, g: &mut Inner, ino: Ino, start: u64, end: u64) -> Res<()> {
        if end <= start {
            return Ok(());
        }
        if let Some(data) = &mut self.node_mut(g, ino)?.inline {
            // Past its inline bytes a file reads as zeros already.
            let len = data.len() as u64;
            data[start.min(len) as usize..end.min(len) as usize].fill(0);
            return Ok(());
        }
        let bs = self.block_size;
        let first_full = start.div_ceil(bs);
        let last_full = end / bs; // exclusive
        if first_full >= last_full {
            return self.write_locked(g, ino, start, &vec![0u8; (end - start) as usize]);
        }
        if start < first_full * bs {
            self.write_locked(
                g,
                ino,
                start,
                &vec![0u8; (first_full * bs - start) as usize],
            )?;
        }
        if end > last_full * bs {
            self.write_locked(
                g,
                ino,
                last_full * bs,
                &vec![0u8; (end - last_full * bs) as usize],
            )?;
        }
        let blocks: Vec<u64> = (first_full..last_full).collect();
        self.mark_blocks(g, ino, &blocks, Loc::Zero)?;
        let top = g.stack.top();
        if self.layout.data(top, ino).exists() {
            let f = self.layer_file(top, ino).map_err(errno)?;
            data::punch_hole(&f, first_full * bs, (last_full - first_full) * bs).map_err(errno)?;
            g.unloggable = true;
        }
        Ok(())
    }

    pub fn opened(&self, ino: Ino) {
        *self.lock().open.entry(ino).or_default() += 1;
    }

    /// Whether any open of `ino` has not been released.
    pub fn is_open(&self, ino: Ino) -> bool {
        self.inner.read().unwrap().open.contains_key(&ino)
    }

    /// One open of `ino` ended; true when it was the last.
    pub fn released(&self, ino: Ino) -> Res<bool> {
        let mut g = self.lock();
        let left = match g.open.get_mut(&ino) {
            Some(c) => {
                *c -= 1;
                *c
            }
            None => return Ok(false),
        };
        if left == 0 {
            g.open.remove(&ino);
            if g.state.nodes.get(&ino).is_some_and(|n| n.meta.nlink == 0) {
                self.drop_node(&mut g, ino)?;
            }
        }
        Ok(left == 0)
    }

    // ---- durability ----

    fn flush_dirty(g: &mut Inner) -> Result<()> {
        let dirty: Vec<Ino> = g.dirty.drain().collect();
        for ino in dirty {
            if let Some(n) = g.state.nodes.get(&ino) {
                let rec = n.record(ino);
                g.journal.append(&rec)?;
            }
        }
        Ok(())
    }

    /// fsync(2) of a file. When few blocks changed since the last sync,
    /// they go with the pending journal records into the fsync log: one
    /// fdatasync of a preallocated file, a cache flush (see `wal`).
    ///
    /// Otherwise a full sync: the data in the top layer, then the journal.
    /// Two fdatasyncs, in this order: a journal record durable before the
    /// block it names would, after a power loss, let the data file's hole
    /// hide the lower layer's bytes of a copied-up block. Not one fsync for
    /// both: that holds only on file systems that commit all files' metadata
    /// together (ext4 without fast_commit), which the store cannot check.
    /// The data file's first fdatasync costs the most anyway (a block
    /// allocation, so a file system journal commit); the journal's is small.
    ///
    /// The journal holds the records of every file written since the last
    /// sync, not only this one's, so the data of all of them goes first
    /// (as ext4's ordered mode writes all ordered data at a commit); with
    /// one file written, as a VM disk image, that is only its own.
    ///
    /// The data is synced without the lock (other operations wait for the
    /// journal's fdatasync only, not the data's); under the lock, what was
    /// written after that is synced too before the journal goes out.
    pub fn fsync(&self, _ino: Option<Ino>) -> Res<()> {
        match self.log_sync(&mut self.lock()) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            // The full sync does not need the log (and resets it).
            Err(e) => tracing::warn!("fsync log: {e}; syncing in full instead"),
        }
        let synced = self.sync_data_unlocked();
        let mut g = self.lock();
        Self::forget_synced(&mut g, &synced);
        self.sync_locked(&mut g).map_err(eio)
    }

    /// A logged fsync: the dirty blocks (as the data files hold them now)
    /// and the pending journal records into the log, then the records into
    /// the journal file, unsynced: the log makes both durable. False when
    /// the batch is too big for the log or it is full: a full sync then.
    fn log_sync(&self, g: &mut Inner) -> Result<bool> {
        if g.unloggable {
            return Ok(false);
        }
        Self::flush_dirty(g)?;
        let top = g.stack.top();
        let mut batch = Vec::with_capacity(g.dirty_blocks.len() + 1);
        let mut size = 0;
        for &(ino, b) in &g.dirty_blocks {
            // Truncated away, zeroed or dropped since: nothing to keep.
            let here = g.state.nodes.get(&ino).and_then(|n| n.blocks.get(&b));
            if here != Some(&Loc::Layer(top)) {
                continue;
            }
            let bytes = self.block_bytes(top, ino, b)?;
            size += wal::Entry::frame_len(bytes.len());
            batch.push(wal::Entry::Block {
                ino,
                off: b * self.block_size,
                bytes,
            });
        }
        let (off, records) = g.journal.pending();
        if !records.is_empty() {
            size += wal::Entry::frame_len(records.len());
            batch.push(wal::Entry::Journal {
                off,
                bytes: records.to_vec(),
            });
        }
        if batch.is_empty() {
            return Ok(true);
        }
        if size > wal::BATCH_MAX || size + 64 > g.wal.room() {
            return Ok(false);
        }
        g.wal.append(&batch)?;
        g.journal.flush()?;
        g.dirty_blocks.clear();
        Ok(true)
    }

    /// Block `b` of `ino` as the top layer's data file holds it, cut at
    /// the file's end.
    fn block_bytes(&self, top: u32, ino: Ino, b: u64) -> Result<Vec<u8>> {
        let path = self.layout.data(top, ino);
        let f = self.data_file(top, ino, false).at("open", &path)?;
        let len = f.metadata().at("stat", &path)?.len();
        let start = b * self.block_size;
        let mut bytes = vec![0u8; len.saturating_sub(start).min(self.block_size) as usize];
        data::pread_full(&f, &mut bytes, start).at("read", &path)?;
        Ok(bytes)
    }

    /// Files whose data `sync_data_unlocked` made durable, unless written
    /// again since: those stay for `sync_locked`.
    fn forget_synced(g: &mut Inner, synced: &[(Ino, u64)]) {
        for (ino, at) in synced {
            if g.unsynced.get(ino) == Some(at) {
                g.unsynced.remove(ino);
            }
        }
    }

    /// fdatasync the files written so far, without holding the lock;
    /// returns those synced, each with the `writes` count its sync covers.
    /// What is not synced here (many files: one syncfs; an error, or a
    /// layer a rollback dropped meanwhile) is left to `sync_locked`, which
    /// reports errors.
    fn sync_data_unlocked(&self) -> Vec<(Ino, u64)> {
        let (top, files): (u32, Vec<(Ino, u64)>) = {
            let g = self.inner.read().unwrap();
            if g.unsynced.len() > SYNCFS_AT {
                return Vec::new();
            }
            let files = g.unsynced.iter().map(|(&i, &n)| (i, n)).collect();
            (g.stack.top(), files)
        };
        let mut synced = Vec::with_capacity(files.len());
        for (ino, at) in files {
            match self.data_file(top, ino, false).and_then(|f| f.sync_data()) {
                Ok(()) => synced.push((ino, at)),
                Err(e) => {
                    tracing::debug!("fsync of inode {ino} left to the locked pass: {e}");
                    break;
                }
            }
        }
        synced
    }

    /// Make everything written so far durable (data of all files too).
    pub fn sync_all(&self) -> Result<()> {
        let mut g = self.lock();
        self.sync_locked(&mut g)
    }

    /// Data first, then the journal that refers to it.
    fn sync_locked(&self, g: &mut Inner) -> Result<()> {
        let top = g.stack.top();
        if g.unsynced.len() > SYNCFS_AT {
            let dir = self.layout.layer(top);
            let f = File::open(&dir).at("open", &dir)?;
            nix::unistd::syncfs(&f).ctx(|| "syncfs of the store".into())?;
        } else {
            for &ino in g.unsynced.keys() {
                let path = self.layout.data(top, ino);
                match self.layer_file(top, ino) {
                    Ok(f) => f.sync_data().at("fsync", &path)?,
                    Err(e) => tracing::warn!("fsync {}: {e}", path.display()),
                }
            }
        }
        g.unsynced.clear();
        Self::flush_dirty(g)?;
        g.journal.sync()?;
        // Everything the log held is durable in place now.
        if !g.wal.is_empty() {
            g.wal.reset()?;
        }
        g.dirty_blocks.clear();
        g.unloggable = false;
        Ok(())
    }

    /// Make the next layer directory in the background, off the clock of
    /// the next checkpoint. Only ever creates: by the time it runs the id
    /// may already be in use.
    pub fn prepare_spare(&self) {
        let next = self.inner.read().unwrap().stack.next_layer;
        let (layout, spare) = (self.layout.clone(), self.spare.clone());
        self.background.spawn("cowfs-spare", move || {
            let taken = spare.lock().unwrap();
            if *taken < next && !layout.layer(next).exists() {
                if let Err(e) = layout.make_layer(next) {
                    tracing::warn!("cannot prepare layer {next}: {e}");
                }
            }
        });
    }

    /// Use the spare layer directory (or make it now) as layer `id`.
    fn take_spare(&self, id: u32) -> Result<()> {
        let mut taken = self.spare.lock().unwrap();
        *taken = (*taken).max(id);
        self.layout.ensure_layer(id)
    }

    pub fn statfs(&self) -> Res<nix::sys::statvfs::Statvfs> {
        nix::sys::statvfs::statvfs(&self.layout.dir).map_err(|e| e as i32)
    }

    // ---- checkpoints ----

    /// Seal the top layer as checkpoint `name`; O(1) in the data size (the
    /// data is made durable first, which costs what is not yet on disk).
    /// The caller prepares the next spare layer (`prepare_spare`) once it
    /// has answered.
    pub fn checkpoint(&self, name: &str) -> Result<()> {
        let mut g = self.lock();
        let next = g.stack.with_checkpoint(name)?;
        self.sync_locked(&mut g)?;
        self.take_spare(next.top())?;
        self.layout.commit_stack(&mut g.committer, &next)?;
        let sealed = g.stack.top();
        g.journal = Writer::open(&self.layout.journal(next.top()))?;
        g.wal.move_to(&self.layout.wal(next.top()))?;
        g.stack = next;
        let snap = g.state.clone();
        g.snapshots.insert(sealed, snap);
        Ok(())
    }

    /// Return the view to checkpoint `name`: O(1) — swap in its state, drop
    /// the layers above it (renamed into the trash, deleted in the
    /// background). Returns the inodes that changed and still exist: the
    /// caller invalidates the kernel's caches of them (and of all names),
    /// and prepares the next spare layer (`prepare_spare`) once it answered.
    pub fn rollback(&self, name: &str) -> Result<Vec<Changed>> {
        let mut g = self.lock();
        let (next, dropped) = g.stack.rolled_back(name)?;
        let layer = g.stack.find(name)?.layer;
        let snap = g
            .snapshots
            .get(&layer)
            .cloned()
            .ok_or_else(|| Error::BadStore(format!("no state for checkpoint {name:?}")))?;
        self.take_spare(next.top())?;
        self.layout.commit_stack(&mut g.committer, &next)?;
        // Inodes numbered from here on were made after the checkpoint.
        let born_after = snap.next_ino;
        let next_ino = snap.next_ino.max(g.state.next_ino);
        let old = std::mem::replace(&mut g.state, snap);
        g.state.next_ino = next_ino;
        g.dirty.clear();
        g.unsynced.clear();
        g.dirty_blocks.clear();
        g.unloggable = false;
        g.journal = Writer::open(&self.layout.journal(next.top()))?;
        g.wal.move_to(&self.layout.wal(next.top()))?;
        let gone: Vec<State> = g
            .snapshots
            .extract_if(|l, _| !next.layers.contains(l))
            .map(|(_, s)| s)
            .collect();
        g.stack = next;
        // Made after the checkpoint: gone now, nothing to look up (most
        // of what a rollback drops, often by thousands).
        let touched: HashSet<Ino> = dropped
            .iter()
            .flat_map(|l| g.touched.remove(l).unwrap_or_default())
            .filter(|&ino| ino < born_after)
            .collect();
        let changed: Vec<Changed> = touched
            .into_iter()
            .filter_map(|ino| {
                let now = self.attr_in(&g.state, ino).ok()?.meta;
                let before = self.attr_in(&old, ino).ok().map(|a| a.meta.size);
                Some(Changed {
                    ino,
                    file: now.kind == Kind::File,
                    open: g.open.contains_key(&ino),
                    size: now.size,
                    grew: before.is_some_and(|b| now.size > b),
                })
            })
            .collect();
        // Inodes open now but gone at the checkpoint cannot come back.
        let Inner { open, state, .. } = &mut *g;
        open.retain(|ino, _| state.nodes.contains_key(ino) || self.base.inode(*ino).is_some());
        drop(g);
        let closed: Vec<Arc<File>> = self
            .files
            .lock()
            .unwrap()
            .extract_if(|(l, _), _| dropped.contains(l))
            .map(|(_, f)| f)
            .collect();
        // Freeing big states, closing files and moving the dropped layers
        // out of the way take milliseconds, and nothing needs them done
        // now: the commit above no longer lists those layers, and a crash
        // before they are gone leaves directories that mount and fsck
        // clear away.
        let layout = self.layout.clone();
        self.background.spawn("cowfs-trash", move || {
            drop((old, gone, closed));
            for &l in &dropped {
                if let Err(e) = layout.trash_layer(l) {
                    tracing::warn!("{e}");
                }
            }
            layout.empty_trash();
        });
        Ok(changed)
    }

    pub fn stack(&self) -> Stack {
        self.inner.read().unwrap().stack.clone()
    }

    /// Swap layers `lower` and `upper` for the merged layer built in `dir`
    /// (see `merge`), if they are still adjacent and `lower` still belongs
    /// to no checkpoint. Returns whether it did.
    pub fn commit_merge(&self, lower: u32, upper: u32, dir: &std::path::Path) -> Result<bool> {
        let mut g = self.lock();
        let pos = g.stack.layers.iter().position(|&l| l == lower);
        let still = pos.is_some_and(|p| {
            g.stack.layers.get(p + 1) == Some(&upper) && p + 2 < g.stack.layers.len()
        }) && !g.stack.checkpoints.iter().any(|c| c.layer == lower);
        if !still {
            let _ = std::fs::remove_dir_all(dir);
            return Ok(false);
        }
        let mut taken = self.spare.lock().unwrap();
        let mut next = g.stack.clone();
        let id = next.next_layer;
        next.next_layer += 1;
        *taken = (*taken).max(id);
        let p = pos.expect("checked");
        next.layers.splice(p..p + 2, [id]);
        for c in &mut next.checkpoints {
            if c.layer == upper {
                c.layer = id;
            }
        }
        // The spare directory made for `id` makes way for the merged layer.
        let target = self.layout.layer(id);
        if target.exists() {
            std::fs::remove_dir_all(&target).at("remove", &target)?;
        }
        std::fs::rename(dir, &target).at("rename", dir)?;
        crate::disk::sync_dir(&self.layout.layers())?;
        self.layout.commit_stack(&mut g.committer, &next)?;
        g.stack = next;
        g.snapshots.remove(&lower);
        if let Some(s) = g.snapshots.remove(&upper) {
            g.snapshots.insert(id, s);
        }
        let mut touched = g.touched.remove(&lower).unwrap_or_default();
        touched.extend(g.touched.remove(&upper).unwrap_or_default());
        g.touched.insert(id, touched);
        {
            let mut alias = self.alias.write().unwrap();
            for v in alias.values_mut() {
                if *v == lower || *v == upper {
                    *v = id;
                }
            }
            alias.insert(lower, id);
            alias.insert(upper, id);
        }
        self.files
            .lock()
            .unwrap()
            .retain(|(l, _), _| *l != lower && *l != upper);
        drop(taken);
        drop(g);
        self.layout.trash_layer(lower)?;
        self.layout.trash_layer(upper)?;
        self.layout.empty_trash();
        self.prepare_spare();
        Ok(true)
    }

    pub fn delete_checkpoint(&self, name: &str) -> Result<()> {
        let mut g = self.lock();
        let next = g.stack.without_checkpoint(name)?;
        self.layout.commit_stack(&mut g.committer, &next)?;
        g.stack = next;
        Ok(())
    }
}

/// The state after the layers of `stack` up to and including `upto`.
pub fn replay_upto(layout: &Layout, stack: &Stack, upto: u32, block_size: u64) -> Result<State> {
    let mut state = State::new();
    for &layer in &stack.layers {
        for rec in journal::read(&layout.journal(layer))?.records {
            state.apply(rec, layer, block_size);
        }
        if layer == upto {
            break;
        }
    }
    Ok(state)
}

/// The inodes each layer's journal changes.
fn touched_by_layer(layout: &Layout, stack: &Stack) -> Result<HashMap<u32, HashSet<Ino>>> {
    let mut out = HashMap::new();
    for &layer in &stack.layers {
        let set: HashSet<Ino> = journal::read(&layout.journal(layer))?
            .records
            .iter()
            .map(Record::ino)
            .collect();
        out.insert(layer, set);
    }
    Ok(out)
}

/// Rebuild the state of every layer of `stack`: the top state and a state
/// per checkpoint. With `repair`, a torn journal tail of the top layer is
/// cut off so that appends continue after the last complete record.
pub fn replay(
    layout: &Layout,
    stack: &Stack,
    block_size: u64,
    repair: bool,
) -> Result<(State, HashMap<u32, State>)> {
    let mut state = State::new();
    let mut snapshots = HashMap::new();
    for &layer in &stack.layers {
        let path = layout.journal(layer);
        let r = journal::read(&path)?;
        if r.torn_bytes > 0 {
            tracing::warn!(
                "layer {layer}: {} bytes of unfinished records after the last complete one",
                r.torn_bytes
            );
            if repair && layer == stack.top() {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .at("open", &path)?;
                f.set_len(r.valid_len).at("truncate", &path)?;
                f.sync_all().at("fsync", &path)?;
            }
        }
        for rec in r.records {
            state.apply(rec, layer, block_size);
        }
        if stack.checkpoints.iter().any(|c| c.layer == layer) {
            snapshots.insert(layer, state.clone());
        }
    }
    Ok((state, snapshots))
}

pub fn errno(e: std::io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn eio(e: Error) -> Errno {
    tracing::error!("{e}");
    match e {
        Error::Io { source, .. } => errno(source),
        _ => libc::EIO,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::ROOT;
    use std::path::Path;

    /// A view of a new store over `base` (in `dir`), with the default
    /// block size.
    fn view_of(dir: &Path, base: &Path) -> View {
        view_with_blocks(dir, base, None)
    }

    /// A view of a new store over an empty base, in a scratch directory
    /// that lives as long as the returned guard.
    fn empty_view() -> (tempfile::TempDir, View) {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base");
        std::fs::create_dir(&base).unwrap();
        let view = view_of(t.path(), &base);
        (t, view)
    }

    /// A view of a new store over `base` (in `dir`).
    pub(crate) fn view_with_blocks(dir: &Path, base: &Path, block_size: Option<u64>) -> View {
        let store = crate::Store::create(&dir.join("store"), base, block_size).unwrap();
        let layout = Layout {
            dir: store.dir().to_owned(),
        };
        let cfg = layout.read_config().unwrap();
        View::load(layout, &cfg).unwrap()
    }

    /// A new empty file `name` in the root, owned by root.
    pub(crate) fn new_file(view: &View, name: &str) -> Ino {
        let new = NewNode {
            kind: Kind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
        };
        view.create(ROOT, OsStr::new(name), new, None).unwrap().ino
    }

    /// The daemon dies: no sync, and its threads (the spare-layer one may
    /// still be making a layer) are gone before anything else touches the
    /// store.
    fn crash(view: View) -> Layout {
        view.background.stop();
        view.layout.clone()
    }

    /// The view a remount would see after a crash of the daemon.
    fn reload(view: View) -> View {
        let layout = crash(view);
        let cfg = layout.read_config().unwrap();
        View::load(layout, &cfg).unwrap()
    }

    /// Cut a journal back to `len` bytes: its unsynced tail lost.
    fn cut(journal: &Path, len: u64) {
        let j = std::fs::OpenOptions::new()
            .write(true)
            .open(journal)
            .unwrap();
        j.set_len(len).unwrap();
    }

    /// The blocks in the committed batches of the top layer's fsync log.
    fn logged_blocks(view: &View) -> Vec<(Ino, Vec<u8>)> {
        let path = view.layout.wal(view.stack().top());
        let mut out = Vec::new();
        for e in wal::read(&path).unwrap().into_iter().flatten() {
            if let wal::Entry::Block { ino, bytes, .. } = e {
                out.push((ino, bytes));
            }
        }
        out
    }

    /// fsync of one file publishes the journal records of every file
    /// written since the last sync, so their data must be durable first:
    /// else, after a power loss, a record could name a block whose bytes
    /// never reached the disk, and its hole would hide the base's bytes.
    /// A few blocks go into the fsync log with the records; more than a
    /// batch holds take the full sync, every file's data first.
    #[test]
    fn fsync_makes_every_published_block_durable_first() {
        let (_t, view) = empty_view();
        let (a, b) = (new_file(&view, "a"), new_file(&view, "b"));
        // Past INLINE_MAX: files with data files.
        let at = INLINE_MAX as usize;
        view.write(a, at as u64, b"not fsynced", None).unwrap();
        view.write(b, at as u64, b"fsynced", None).unwrap();
        view.fsync(Some(b)).unwrap();
        let mut logged = logged_blocks(&view);
        logged.sort();
        let block = |text: &[u8]| [vec![0u8; at], text.to_vec()].concat();
        assert_eq!(
            logged,
            vec![(a, block(b"not fsynced")), (b, block(b"fsynced"))]
        );
        let blocks = wal::BATCH_MAX / view.block_size + 1;
        for i in 0..blocks {
            view.write(a, i * view.block_size, b"many", None).unwrap();
        }
        view.write(b, 0, b"again", None).unwrap();
        view.fsync(Some(b)).unwrap();
        assert!(view.inner.read().unwrap().unsynced.is_empty());
        assert!(
            logged_blocks(&view).is_empty(),
            "a full sync resets the log"
        );
    }

    /// A small new file keeps its data in the metadata: no data file, the
    /// bytes survive a reload, truncate, punch and rollback act on them,
    /// and a write past INLINE_MAX moves them to a data file intact.
    #[test]
    fn small_files_keep_their_data_inline_until_they_outgrow_it() {
        let (_t, view) = empty_view();
        let f = new_file(&view, "f");
        let top = view.stack().top();
        view.write(f, 0, b"hello world", None).unwrap();
        view.write(f, 100, b"!", None).unwrap();
        assert!(!view.layout.data(top, f).exists(), "a data file was made");
        let mut want = b"hello world".to_vec();
        want.resize(101, 0);
        want[100] = b'!';
        assert_eq!(view.read(f, 0, 4096).unwrap(), want);
        view.fallocate(
            f,
            2,
            3,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
        .unwrap();
        want[2..5].fill(0);
        let cut = SetAttr {
            size: Some(50),
            ..SetAttr::default()
        };
        view.setattr(f, cut, &Caller::default()).unwrap();
        want.truncate(50);
        let grow = SetAttr {
            size: Some(200),
            ..SetAttr::default()
        };
        view.setattr(f, grow, &Caller::default()).unwrap();
        want.resize(200, 0);
        assert_eq!(view.read(f, 0, 4096).unwrap(), want);
        view.checkpoint("small").unwrap();
        view.write(f, 0, b"HELLO", None).unwrap();
        view.rollback("small").unwrap();
        assert_eq!(view.read(f, 0, 4096).unwrap(), want);
        // A reload replays the data from the journal.
        view.sync_all().unwrap();
        let view = reload(view);
        assert_eq!(view.read(f, 0, 4096).unwrap(), want);
        // Outgrown: into a data file, the inline bytes first.
        view.write(f, INLINE_MAX, b"big", None).unwrap();
        let top = view.stack().top();
        assert!(view.layout.data(top, f).exists());
        want.resize(INLINE_MAX as usize, 0);
        want.extend_from_slice(b"big");
        assert_eq!(view.read(f, 0, 8192).unwrap(), want);
        assert!(view.inner.read().unwrap().state.nodes[&f].inline.is_none());
    }

    /// The fsync log goes with the top layer: after a checkpoint and after a
    /// rollback only the new top has it, logged fsyncs work there, and what
    /// a dropped layer logged is not replayed.
    #[test]
    fn the_fsync_log_moves_with_the_top_layer() {
        let (_t, view) = empty_view();
        let f = new_file(&view, "f");
        let logs = |view: &View| -> Vec<u32> {
            let stack = view.stack();
            let with = stack
                .layers
                .iter()
                .filter(|&&l| view.layout.wal(l).exists());
            with.copied().collect()
        };
        view.write(f, INLINE_MAX, b"one", None).unwrap();
        view.fsync(Some(f)).unwrap();
        view.checkpoint("a").unwrap();
        assert_eq!(logs(&view), vec![view.stack().top()]);
        view.write(f, INLINE_MAX, b"two", None).unwrap();
        view.fsync(Some(f)).unwrap();
        assert_eq!(logged_blocks(&view).len(), 1);
        view.rollback("a").unwrap();
        assert_eq!(logs(&view), vec![view.stack().top()]);
        assert!(logged_blocks(&view).is_empty());
        let view = reload(view);
        assert_eq!(view.read(f, INLINE_MAX, 10).unwrap(), b"one");
    }

    /// Checkpoint and rollback of a store that is not mounted, after a
    /// crash left fsynced writes only in the log: the checkpoint keeps
    /// them, the rollback's new top does not replay the dropped layer's.
    #[test]
    fn offline_checkpoint_and_rollback_take_care_of_the_log() {
        let (t, view) = empty_view();
        let f = new_file(&view, "f");
        view.sync_all().unwrap();
        let lose_all_but_the_log = |view: View| {
            let top = view.stack().top();
            let journal = view.layout.journal(top);
            let len = std::fs::metadata(&journal).unwrap().len();
            view.fsync(Some(f)).unwrap();
            assert!(!logged_blocks(&view).is_empty());
            crash(view);
            cut(&journal, len);
        };
        view.write(f, INLINE_MAX, b"kept", None).unwrap();
        lose_all_but_the_log(view);
        let store = crate::Store::open(&t.path().join("store")).unwrap();
        let found = store.fsck(false).unwrap();
        assert!(
            found.unfinished.iter().any(|u| u.contains("fsync log")),
            "{found:?}"
        );
        store.checkpoint("a").unwrap();
        assert!(
            store.fsck(false).unwrap().clean(),
            "the checkpoint replayed it"
        );
        let load = || {
            let layout = Layout {
                dir: store.dir().to_owned(),
            };
            let cfg = layout.read_config().unwrap();
            View::load(layout, &cfg).unwrap()
        };
        let view = load();
        assert_eq!(view.read(f, INLINE_MAX, 10).unwrap(), b"kept");
        view.write(f, INLINE_MAX, b"gone", None).unwrap();
        lose_all_but_the_log(view);
        store.rollback("a").unwrap();
        let view = load();
        assert_eq!(view.read(f, INLINE_MAX, 10).unwrap(), b"kept");
        let stack = view.stack();
        let logs: Vec<u32> = stack
            .layers
            .iter()
            .copied()
            .filter(|&l| view.layout.wal(l).exists())
            .collect();
        assert_eq!(logs, vec![stack.top()]);
    }

    /// A crash can lose the records of a new inode but not its data file;
    /// the inode's number is then handed out again. The new file must not
    /// show the lost one's bytes where it has not written.
    #[test]
    fn an_inode_number_given_again_after_a_crash_shows_no_stale_bytes() {
        let (t, view) = empty_view();
        let lost = new_file(&view, "lost");
        view.write(lost, 0, &[0xab; 200_000], None).unwrap();
        // The crash: the journal buffer never reached the file.
        let view = reload(view);
        let again = new_file(&view, "again");
        assert_eq!(again, lost, "the test needs the number given again");
        view.write(again, 10, b"new", None).unwrap();
        view.write(again, 70_000, b"more", None).unwrap();
        let set = SetAttr {
            size: Some(150_000),
            ..SetAttr::default()
        };
        view.setattr(again, set, &Caller::default()).unwrap();
        let mut want = vec![0u8; 150_000];
        want[10..13].copy_from_slice(b"new");
        want[70_000..70_004].copy_from_slice(b"more");
        assert!(view.read(again, 0, 150_000).unwrap() == want, "stale bytes");
        drop(t);
    }

    /// A power loss after a logged fsync can lose everything else written
    /// since the last full sync: the journal's new records and the data
    /// files. Loading the store replays the log: the copied-up block (with
    /// the base's bytes around the write) and a new file are back.
    #[test]
    fn a_logged_fsync_survives_losing_the_unsynced_journal_and_data() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base");
        std::fs::create_dir(&base).unwrap();
        let pattern: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(base.join("f"), &pattern).unwrap();
        let view = view_of(t.path(), &base);
        let f = view.lookup(ROOT, OsStr::new("f")).unwrap().ino;
        let top = view.stack().top();
        let journal = view.layout.journal(top);
        let synced_len = std::fs::metadata(&journal).unwrap().len();
        view.write(f, 70_000, &[0xee; 4096], None).unwrap();
        let n = new_file(&view, "n");
        view.write(n, 0, &[0x11; 10_000], None).unwrap();
        let small = new_file(&view, "small");
        view.write(small, 0, b"inline", None).unwrap();
        view.fsync(Some(f)).unwrap();
        assert_eq!(logged_blocks(&view).len(), 2, "the fsync was logged");
        let layout = crash(view);
        // The power loss: nothing but the log made it to the disk.
        cut(&journal, synced_len);
        std::fs::remove_dir_all(layout.data_dir(top)).unwrap();
        std::fs::create_dir(layout.data_dir(top)).unwrap();
        let cfg = layout.read_config().unwrap();
        let view = View::load(layout, &cfg).unwrap();
        let mut want = pattern.clone();
        want[70_000..74_096].fill(0xee);
        assert_eq!(view.read(f, 0, 300_000).unwrap(), want);
        let n = view.lookup(ROOT, OsStr::new("n")).unwrap().ino;
        assert_eq!(view.read(n, 0, 20_000).unwrap(), vec![0x11; 10_000]);
        let small = view.lookup(ROOT, OsStr::new("small")).unwrap().ino;
        assert_eq!(view.read(small, 0, 100).unwrap(), b"inline");
        assert!(logged_blocks(&view).is_empty(), "replayed, then reset");
    }

    /// fsync syncs data without the lock; a file written again after that
    /// (or first written after it) must still be synced under the lock
    /// before the journal, which holds its new records, goes out.
    #[test]
    fn writes_racing_with_an_fsync_are_synced_before_its_journal() {
        let (_t, view) = empty_view();
        let (a, b, c) = (
            new_file(&view, "a"),
            new_file(&view, "b"),
            new_file(&view, "c"),
        );
        // Past INLINE_MAX: files with data files.
        let at = INLINE_MAX;
        view.write(a, at, b"a1", None).unwrap();
        view.write(b, at, b"b1", None).unwrap();
        let synced = view.sync_data_unlocked();
        assert_eq!(synced.len(), 2);
        view.write(a, at + 4096, b"a2", None).unwrap();
        view.write(c, at, b"c1", None).unwrap();
        let mut g = view.lock();
        View::forget_synced(&mut g, &synced);
        let mut left: Vec<Ino> = g.unsynced.keys().copied().collect();
        left.sort();
        assert_eq!(left, vec![a, c]);
    }

    /// Records reach the journal file only with a sync, data first, even
    /// when no one calls fsync: once the buffer is full, the next change
    /// syncs.
    #[test]
    fn a_full_journal_buffer_is_synced_data_first() {
        let (_t, view) = empty_view();
        let ino = new_file(&view, "f");
        let journal = view.layout.journal(view.stack().top());
        let mut block = 0;
        while !view.inner.read().unwrap().journal.full() {
            // One record per write: blocks far apart.
            view.write(ino, block * 2 * view.block_size, b"x", None)
                .unwrap();
            block += 1;
            assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
        }
        new_file(&view, "next");
        let g = view.inner.read().unwrap();
        assert!(g.unsynced.is_empty() && !g.journal.full());
        assert!(std::fs::metadata(&journal).unwrap().len() > 0);
    }

    /// A spare made late (its thread delayed past a checkpoint that took
    /// its id and a rollback that dropped that layer) must not bring the
    /// dropped layer's directory back: fsck would report it.
    #[test]
    fn a_spare_made_late_does_not_bring_back_a_dropped_layer() {
        let (_t, view) = empty_view();
        view.background.wait();
        let next = view.stack().next_layer;
        {
            let mut taken = view.spare.lock().unwrap();
            view.prepare_spare(); // its thread now waits for the lock
            *taken = next;
            std::fs::remove_dir_all(view.layout.layer(next)).unwrap();
        }
        view.background.wait();
        assert!(!view.layout.layer(next).exists());
        // Ahead of the ids taken, spares are made as before.
        view.prepare_spare();
        view.background.wait();
        assert!(!view.layout.layer(next).exists());
        view.checkpoint("a").unwrap();
        view.prepare_spare();
        view.background.wait();
        assert!(view.layout.is_empty_layer(next + 1));
    }

    /// Whether the parts that need root (host xattrs of base files) run:
    /// without root they are skipped, but not under CI.
    fn as_root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        assert!(
            root || std::env::var_os("CI").is_none(),
            "CI must run as root (host capability xattrs)"
        );
        root
    }

    /// Give the host file `path` a capability xattr (needs CAP_SETFCAP).
    fn set_host_capability(path: &Path) {
        let value: Vec<u8> = [0x0200_0000u32, 1 << 10, 0, 0, 0]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        crate::sys::set_xattr(path, CAPABILITY, &value).unwrap();
    }

    /// The operations the capability test tries, each on files of its own.
    const CAPABILITY_OPS: [&str; 4] = ["write", "truncate", "chown", "chmod"];

    /// As root, give the base one file with a capability per operation.
    /// They must exist before the view opens: the base is read-only by
    /// contract, and the view may answer lookups from a listing read ahead.
    fn base_files_with_capability(base: &Path) {
        if as_root() {
            for op in CAPABILITY_OPS {
                let path = base.join(format!("base-{op}"));
                std::fs::write(&path, b"base data").unwrap();
                set_host_capability(&path);
            }
        }
    }

    /// The files each operation is tried on: one made in the top layer
    /// (its capability set through the view) and, as root, one of the base
    /// (its capability on the host file, which must stay there).
    fn files_with_capability(view: &View, op: &str) -> Vec<Ino> {
        let ino = new_file(view, &format!("new-{op}"));
        view.write(ino, 0, b"data", None).unwrap();
        view.setxattr(ino, CAPABILITY, Some(b"cap"), 0).unwrap();
        let mut files = vec![ino];
        if as_root() {
            let name = format!("base-{op}");
            files.push(view.lookup(ROOT, OsStr::new(&name)).unwrap().ino);
        }
        for &ino in &files {
            assert!(view.getxattr(ino, CAPABILITY).is_ok());
        }
        files
    }

    /// The kernel stops looking for security.capability once it has marked
    /// an inode S_NOSEC (FUSE_HANDLE_KILLPRIV_V2), so the view drops it
    /// itself at every write, truncate and chown, and nowhere else.
    #[test]
    fn write_truncate_and_chown_drop_the_capability() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base");
        std::fs::create_dir(&base).unwrap();
        base_files_with_capability(&base);
        let view = view_of(t.path(), &base);
        let root = Caller {
            fsetid: true,
            groups: vec![0],
        };
        type Op<'a> = (&'a str, Box<dyn Fn(Ino) -> Res<()> + 'a>);
        let drops: Vec<Op> = vec![
            (
                "write",
                Box::new(|ino| view.write(ino, 1, b"x", None).map(drop)),
            ),
            (
                "truncate",
                Box::new(|ino| {
                    let set = SetAttr {
                        size: Some(2),
                        ..SetAttr::default()
                    };
                    view.setattr(ino, set, &root).map(drop)
                }),
            ),
            (
                "chown",
                Box::new(|ino| {
                    let set = SetAttr {
                        uid: Some(0),
                        ..SetAttr::default()
                    };
                    view.setattr(ino, set, &root).map(drop)
                }),
            ),
        ];
        for (op, f) in &drops {
            for ino in files_with_capability(&view, op) {
                f(ino).unwrap();
                assert_eq!(view.getxattr(ino, CAPABILITY), Err(libc::ENODATA), "{op}");
            }
        }
        for ino in files_with_capability(&view, "chmod") {
            let set = SetAttr {
                mode: Some(0o600),
                ..SetAttr::default()
            };
            view.setattr(ino, set, &root).unwrap();
            assert!(view.getxattr(ino, CAPABILITY).is_ok(), "chmod");
        }
        if as_root() {
            let host = crate::sys::get_xattr(&base.join("base-write"), CAPABILITY);
            assert!(host.is_ok(), "the base file lost its capability");
        }
    }
}
