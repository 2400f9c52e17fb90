//! The FUSE adapter: each kernel request becomes one `View` call, and the
//! answer goes back with long cache lifetimes (this daemon is the only
//! writer; a rollback invalidates the kernel's caches explicitly).

use crate::base::Listing;
use crate::state::{Ino, Kind, ROOT};
use crate::view::{Attr, Caller, Changed, NewNode, Res, SetAttr, View};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use crate::mount::{MountOptions, Transport};
use crate::passthrough::{Passthrough, WRITER_BIT};

/// How long the kernel may cache entries and attributes.
const TTL: Duration = Duration::from_secs(3600);

/// What the kernel may have cached, so that a rollback can invalidate
/// what changed.
#[derive(Default)]
pub struct KernelCache {
    /// (directory, name) -> inode, as told to the kernel.
    entries: Mutex<HashMap<(Ino, OsString), Ino>>,
    /// Inode generations other than 0: a rollback gives a changed file that
    /// no one has open a new one, so that the kernel takes its cached inode
    /// for a stale one and makes a fresh one (no pages, the right size) at
    /// the next lookup, instead of dropping its pages now.
    generations: Mutex<HashMap<Ino, u64>>,
    /// Inodes renewed that way. An open racing with the rollback may still
    /// reach the old kernel inode: opens of these do not keep the cache, so
    /// the kernel drops whatever pages that inode holds at the open. The set
    /// only grows while mounted: the price is a cold cache at each open of a
    /// file some rollback changed.
    renewed: Mutex<HashSet<Ino>>,
    /// Files a rollback changed while they were open (or while their last
    /// close was still on its way: the kernel sends RELEASE after close(2)
    /// returns), renewed at their last release, with the notifier to do it.
    renew_at_release: Mutex<(HashSet<Ino>, Option<Notifier>)>,
    /// The mount's notifier, set once its session exists.
    notifier: OnceLock<Notifier>,
    /// Files open for writing, with their count of writable opens: only
    /// those can have dirty pages in the kernel (close(2) writes a file's
    /// pages back before it returns, and a shared writable mapping keeps
    /// its file open).
    writers: Mutex<HashMap<Ino, u64>>,
}

impl KernelCache {
    pub fn set_notifier(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }

    /// Whether the kernel may hold writes this daemon has not seen yet, so
    /// that a checkpoint or rollback has to make it write them back first.
    pub fn may_hold_writes(&self) -> bool {
        !self.writers.lock().unwrap().is_empty()
    }

    /// Has the kernel write back the dirty pages of every file open for
    /// writing, and waits until this daemon has them. A syncfs(2) does not
    /// wait for that on a FUSE mount (the kernel does not wait on writeback
    /// an unprivileged daemon may never finish), so a checkpoint taken
    /// right after one could miss writes still on their way. Invalidating a
    /// file's pages does wait: each dirty page is written (a WRITE this
    /// daemon's other threads serve) and waited for before it goes. The
    /// clean pages go too, to be read again: the price of a checkpoint
    /// while files are open for writing. Call from a thread that is not
    /// serving FUSE requests.
    pub fn write_back_writers(&self) {
        let inos: Vec<Ino> = self.writers.lock().unwrap().keys().copied().collect();
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        for ino in inos {
            if let Err(e) = notifier.inval_inode(INodeNo(ino), 0, 0) {
                // ENOENT: the kernel forgot the inode, and with it its pages.
                tracing::debug!("writing back inode {ino}: {e}");
            }
        }
    }

    /// The handle of a new open of `ino`: it tells `release` whether it was
    /// one of the `writers`.
    fn handle(&self, ino: Ino, writable: bool) -> FileHandle {
        if writable {
            *self.writers.lock().unwrap().entry(ino).or_default() += 1;
            FileHandle(WRITER_BIT)
        } else {
            FileHandle(0)
        }
    }

    fn closed(&self, ino: Ino, fh: FileHandle) {
        if fh.0 & WRITER_BIT != 0 {
            let mut writers = self.writers.lock().unwrap();
            if let Some(n) = writers.get_mut(&ino) {
                *n -= 1;
                if *n == 0 {
                    writers.remove(&ino);
                }
            }
        }
    }

    /// Make the kernel ask again for the attributes of `ino`. Needed after
    /// a write that cleared setuid or setgid: the kernel keeps the mode it
    /// has (for the TTL) since a WRITE reply carries no attributes.
    fn attributes_changed(&self, ino: Ino) {
        let Some(notifier) = self.notifier.get() else {
            return tracing::warn!("no notifier yet: inode {ino} keeps a stale mode");
        };
        // Attributes only (offset < 0): the kernel takes no lock this
        // request's caller holds, so it is safe before the reply.
        if let Err(e) = notifier.inval_inode(INodeNo(ino), -1, 0) {
            tracing::warn!("cannot invalidate the attributes of inode {ino}: {e}");
        }
    }
    /// The last open of `ino` ended: if a rollback changed it while open,
    /// renew it now (new generation, its names dropped), so that the
    /// kernel's next lookup makes a fresh inode with the right size.
    fn last_release(&self, ino: Ino) {
        let notifier = {
            let mut pending = self.renew_at_release.lock().unwrap();
            if !pending.0.remove(&ino) {
                return;
            }
            pending.1.clone()
        };
        *self.generations.lock().unwrap().entry(ino).or_default() += 1;
        self.renewed.lock().unwrap().insert(ino);
        let mut names = Vec::new();
        self.entries.lock().unwrap().retain(|(dir, name), i| {
            let keep = *i != ino;
            if !keep {
                names.push((*dir, name.clone()));
            }
            keep
        });
        // Not from this request's thread: the kernel may call back.
        if let Some(notifier) = notifier {
            std::thread::spawn(move || {
                for (dir, name) in names {
                    let _ = notifier.inval_entry(INodeNo(dir), &name);
                }
            });
        }
    }

    fn saw(&self, dir: Ino, name: &OsStr, ino: Ino) {
        self.entries
            .lock()
            .unwrap()
            .insert((dir, name.to_owned()), ino);
    }

    fn generation(&self, ino: Ino) -> Generation {
        Generation(
            self.generations
                .lock()
                .unwrap()
                .get(&ino)
                .copied()
                .unwrap_or(0),
        )
    }

    fn keep_cache(&self, ino: Ino) -> FopenFlags {
        if self.renewed.lock().unwrap().contains(&ino) {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        }
    }

    /// After a rollback: make every cached name stale (one FUSE epoch
    /// increment where the kernel has it, else one by one) and make the
    /// kernel's idea of each changed inode right before returning:
    /// - a changed file no one has open gets a new generation: the next
    ///   lookup replaces the kernel's inode, whose pages are dropped when its
    ///   names are invalidated, in the background (for a 1 GiB file that is
    ///   about 90 ms the caller does not wait for);
    /// - an open file has its pages dropped now, and its size raised where it
    ///   grew (with the writeback cache the kernel ignores the size in
    ///   attributes). A size that shrank stays the kernel's larger one until
    ///   the file is closed (the kernel takes short reads for holes, and
    ///   only a truncate through the mount lowers it: a known limit); at
    ///   its last release the file is renewed as below. So is a file whose
    ///   last close had not reached us yet (RELEASE comes after close(2));
    /// - anything else (directories, links) has its attributes dropped.
    ///
    /// Whether a file is open is decided under the view's lock, but an open
    /// racing with the rollback can still reach the old kernel inode; that
    /// is why opens of renewed inodes never keep the cache (the kernel then
    /// drops the inode's pages at the open, so its bytes are right).
    ///
    /// Must not be called with the view locked: the kernel may call back.
    pub fn after_rollback(
        &self,
        view: &View,
        notifier: &Notifier,
        fuse_fd: BorrowedFd<'_>,
        changed: &[Changed],
    ) {
        let all: HashSet<Ino> = changed.iter().map(|c| c.ino).collect();
        let renew: HashSet<Ino> = {
            // A file open when the rollback looked may have had its last
            // release since, which found nothing to renew: it is renewed
            // here. Decided under this lock, which `last_release` takes
            // after the view has counted the close, so exactly one of the
            // two renews it.
            let mut pending = self.renew_at_release.lock().unwrap();
            let renew: HashSet<Ino> = changed
                .iter()
                .filter(|c| c.file && (!c.open || !view.is_open(c.ino)))
                .map(|c| c.ino)
                .collect();
            pending.0.extend(
                changed
                    .iter()
                    .filter(|c| c.file && !renew.contains(&c.ino))
                    .map(|c| c.ino),
            );
            pending.1 = Some(notifier.clone());
            renew
        };
        {
            let mut gens = self.generations.lock().unwrap();
            for &ino in &renew {
                *gens.entry(ino).or_default() += 1;
            }
            self.renewed.lock().unwrap().extend(&renew);
        }
        let all_at_once = match crate::sys::fuse_inc_epoch(fuse_fd) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!("FUSE_NOTIFY_INC_EPOCH unavailable ({e}): names one by one");
                false
            }
        };
        let mut dirs = HashSet::from([ROOT]);
        let mut later = Vec::new();
        self.entries.lock().unwrap().retain(|(dir, name), ino| {
            if renew.contains(ino) {
                later.push((*dir, name.clone()));
                return false;
            }
            if all_at_once && !all.contains(ino) {
                return true;
            }
            dirs.insert(*dir);
            let _ = notifier.inval_entry(INodeNo(*dir), name);
            false
        });
        for c in changed.iter().filter(|c| !renew.contains(&c.ino)) {
            let _ = notifier.inval_inode(INodeNo(c.ino), 0, 0);
            if c.file && c.grew {
                // The kernel raises the size only for a store of at least
                // one byte: the file's last one, which is its true value.
                let last = view.read(c.ino, c.size - 1, 1).unwrap_or_default();
                if let Err(e) = notifier.store(INodeNo(c.ino), c.size - last.len() as u64, &last) {
                    tracing::warn!("cannot raise the cached size of inode {}: {e}", c.ino);
                }
            }
        }
        for dir in dirs {
            let _ = notifier.inval_inode(INodeNo(dir), -1, 0);
        }
        let notifier = notifier.clone();
        std::thread::spawn(move || {
            // Dropping a big file's pages takes milliseconds of CPU, which
            // the caller of the rollback should not wait behind.
            crate::background::lower_priority();
            for (dir, name) in later {
                let _ = notifier.inval_entry(INodeNo(dir), &name);
            }
        });
    }
}

pub struct CowFuse {
    view: Arc<View>,
    kernel: Arc<KernelCache>,
    next_fh: AtomicU64,
    dirs: Mutex<HashMap<u64, Listing>>,
    /// Asked for at mount (`MountOptions::passthrough`).
    want_passthrough: bool,
    /// Set at INIT if the kernel agreed.
    passthrough: Option<Passthrough>,
    /// Asked for at mount (`MountOptions::transport`).
    transport: Transport,
}

impl CowFuse {
    pub fn new(view: Arc<View>, kernel: Arc<KernelCache>, opts: &MountOptions) -> Self {
        CowFuse {
            view,
            kernel,
            next_fh: AtomicU64::new(1),
            dirs: Mutex::default(),
            want_passthrough: opts.passthrough,
            passthrough: None,
            transport: opts.transport,
        }
    }

    /// Passthrough if asked for and the kernel has it (the daemon also
    /// needs CAP_SYS_ADMIN to register backing files, checked per open);
    /// else the writeback cache, which the kernel does not combine with it.
    fn choose_caching(&mut self, config: &mut KernelConfig) {
        if self.want_passthrough {
            if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() {
                // The base may not itself be stacked (depth 0); one level
                // lets the backing files be opened and keeps cowfs
                // stackable under another overlay.
                let _ = config.set_max_stack_depth(1);
                // Direct I/O opens (beside passthrough ones) stay mappable.
                let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
                self.passthrough = Some(Passthrough::default());
                return;
            }
            tracing::warn!("the kernel lacks FUSE passthrough: using the writeback cache");
        }
        if config
            .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
            .is_err()
        {
            tracing::info!("kernel lacks the FUSE writeback cache");
        }
    }

    /// FUSE over io_uring if the transport asks for it and the kernel
    /// agrees; a kernel that refuses fails the mount only if io_uring was
    /// required.
    fn choose_transport(&self, config: &mut KernelConfig) -> std::io::Result<()> {
        if !self.transport.wants_io_uring() {
            tracing::info!("requests come over /dev/fuse");
            return Ok(());
        }
        if config
            .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
            .is_ok()
        {
            tracing::info!("requests come over io_uring");
            return Ok(());
        }
        let e = format!(
            "the kernel refused FUSE over io_uring ({})",
            crate::mount::URING_SWITCH
        );
        if self.transport == Transport::IoUring {
            return Err(std::io::Error::other(e));
        }
        tracing::info!("{e}: requests come over /dev/fuse");
        Ok(())
    }

    fn entry(&self, dir: Ino, name: &OsStr, r: Res<Attr>, reply: ReplyEntry) {
        match r {
            Ok(a) => {
                self.kernel.saw(dir, name, a.ino);
                reply.entry(&TTL, &file_attr(&a), self.kernel.generation(a.ino))
            }
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    /// The entries of an open directory from `offset` on, "." and ".."
    /// first, each with the offset of the entry after it.
    fn entries_from(
        &self,
        fh: FileHandle,
        dir: Ino,
        offset: u64,
    ) -> Option<Vec<(u64, OsString, Ino, Kind)>> {
        let list = self.dirs.lock().unwrap().get(&fh.0).cloned()?;
        let dots = [
            (OsString::from("."), dir, Kind::Dir),
            (OsString::from(".."), ROOT, Kind::Dir),
        ];
        Some(
            dots.iter()
                .chain(list.iter())
                .enumerate()
                .skip(offset as usize)
                // More than one reply buffer (a page) can hold.
                .take(512)
                .map(|(i, (name, ino, kind))| (i as u64 + 1, name.clone(), *ino, *kind))
                .collect(),
        )
    }

    fn new_node(req: &Request, mode: u32, rdev: u32) -> Option<NewNode> {
        Some(NewNode {
            kind: Kind::from_mode(mode)?,
            perm: mode & 0o7777,
            uid: req.uid(),
            gid: req.gid(),
            rdev,
        })
    }
}

/// What the kernel knows about the caller of `req` when it decides
/// whether a write, truncate or chown clears setuid and setgid: whether it
/// has CAP_FSETID in the initial user namespace (`capable(CAP_FSETID)`)
/// and its groups.
///
/// It exists because fuser 0.18 does not pass FATTR_KILL_SUIDGID on to
/// `setattr`: the kernel sets that flag on a size change exactly when the
/// caller lacks CAP_FSETID, so it is decided again here from the same
/// facts, read from /proc while the caller is blocked in its system call
/// (the kernel gives its thread id, which /proc takes). What cannot be read
/// (the task is gone, or not in our pid namespace: pid 0) counts as no
/// privilege and no group, which clears the bits as for any unprivileged
/// caller.
fn caller(req: &Request) -> Caller {
    const CAP_FSETID: u32 = 4;
    let proc = Path::new("/proc").join(req.pid().to_string());
    let status = std::fs::read_to_string(proc.join("status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_default()
    };
    let effective = u64::from_str_radix(field("CapEff").trim(), 16).unwrap_or(0);
    // Capabilities held in a child user namespace (a container's root) do
    // not count for capable(); the initial one maps every uid to itself.
    let initial_userns = std::fs::read_to_string(proc.join("uid_map"))
        .is_ok_and(|map| map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"]);
    let mut groups = vec![req.gid()];
    groups.extend(
        field("Groups")
            .split_whitespace()
            .filter_map(|g| g.parse::<u32>().ok()),
    );
    Caller {
        fsetid: initial_userns && effective & (1 << CAP_FSETID) != 0,
        groups,
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
        Kind::Socket => FileType::Socket,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let m = &a.meta;
    FileAttr {
        ino: INodeNo(a.ino),
        size: m.size,
        blocks: a.blocks512,
        atime: m.atime.into(),
        mtime: m.mtime.into(),
        ctime: m.ctime.into(),
        crtime: SystemTime::UNIX_EPOCH,
        kind: file_type(m.kind),
        perm: m.perm as u16,
        nlink: m.nlink,
        uid: m.uid,
        gid: m.gid,
        rdev: m.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn time(t: Option<TimeOrNow>) -> Option<crate::state::Ts> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(s) => s.into(),
        TimeOrNow::Now => crate::state::Ts::now(),
    })
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn empty(r: Res<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(err(e)),
    }
}

fn data(r: Res<Vec<u8>>, reply: ReplyData) {
    match r {
        Ok(d) => reply.data(&d),
        Err(e) => reply.error(err(e)),
    }
}

fn xattr_reply(r: Res<Vec<u8>>, size: u32, reply: ReplyXattr) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(err(e)),
    }
}

impl Filesystem for CowFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.choose_caching(config);
        self.choose_transport(config)?;
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_ASYNC_READ,
            // Without it the kernel asks for security.capability before
            // every write(2) (a GETXATTR round trip: 4 KiB random writes
            // ran at 0.2-0.3x native); with it, it marks an inode that has
            // neither setuid/setgid nor capabilities and stops asking, and
            // this file system clears them itself on write, truncate and
            // chown (`View::write`, `View::setattr`).
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::info!("kernel lacks FUSE capability {cap:?}");
            }
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(parent.0, name, self.view.lookup(parent.0, name), reply)
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.view.attr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time(atime),
            mtime: time(mtime),
            ctime: ctime.map(Into::into),
        };
        // Only a size or owner change looks at who asks. An open(O_TRUNC)
        // comes here too: the mount does not ask for FUSE_ATOMIC_O_TRUNC,
        // so no OPEN carries FUSE_OPEN_KILL_SUIDGID.
        let who = if size.is_some() || uid.is_some() || gid.is_some() {
            caller(req)
        } else {
            Caller::default()
        };
        match self.view.setattr(ino.0, set, &who) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        data(self.view.readlink(ino.0), reply)
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(new) = Self::new_node(req, mode, rdev) else {
            return reply.error(Errno::EINVAL);
        };
        self.entry(
            parent.0,
            name,
            self.view.create(parent.0, name, new, None),
            reply,
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let new = Self::new_node(req, libc::S_IFDIR | (mode & 0o7777), 0).expect("dir kind");
        self.entry(
            parent.0,
            name,
            self.view.create(parent.0, name, new, None),
            reply,
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.view.remove(parent.0, name, false), reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.view.remove(parent.0, name, true), reply)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let new = Self::new_node(req, libc::S_IFLNK | 0o777, 0).expect("symlink kind");
        let t = target.as_os_str().as_bytes();
        self.entry(
            parent.0,
            link_name,
            self.view.create(parent.0, link_name, new, Some(t)),
            reply,
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        empty(
            self.view
                .rename(parent.0, name, newparent.0, newname, flags.bits()),
            reply,
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            newparent.0,
            newname,
            self.view.link(ino.0, newparent.0, newname),
            reply,
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.view.attr(ino.0) {
            Ok(_) => {
                self.view.opened(ino.0);
                let writable = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
                let fh = self.kernel.handle(ino.0, writable);
                let cached = self.kernel.keep_cache(ino.0);
                match &self.passthrough {
                    Some(p) => p.open(&self.view, ino.0, fh, writable, cached, reply),
                    None => reply.opened(fh, cached),
                }
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        data(self.view.read(ino.0, offset, size), reply)
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Set only for a writer without CAP_FSETID into a file with
        // setuid or setgid: rare enough to read the writer's groups.
        let kill = write_flags
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then(|| Caller {
                fsetid: false,
                ..caller(req)
            });
        let written = self.view.write(ino.0, offset, data, kill.as_ref());
        if kill.is_some() {
            self.kernel.attributes_changed(ino.0);
        }
        match written {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(err(e)),
        }
    }

    /// close(2) sends FLUSH, a round trip per close that this file system
    /// has no use for: the kernel writes a closed file's dirty pages back
    /// before it (the writeback cache), and locks are the kernel's own.
    /// ENOSYS makes the kernel stop sending it for the whole mount.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS)
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.kernel.closed(ino.0, fh);
        if let Some(p) = &self.passthrough {
            p.released(ino.0, fh);
        }
        let released = self.view.released(ino.0).map(|last| {
            if last {
                self.kernel.last_release(ino.0);
            }
        });
        empty(released, reply)
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        empty(self.view.fsync(Some(ino.0)), reply)
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.view.list(ino.0) {
            Ok(list) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.dirs.lock().unwrap().insert(fh, Arc::new(list));
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.entries_from(fh, ino.0, offset) else {
            return reply.error(Errno::EBADF);
        };
        for (next, name, child, kind) in entries {
            if reply.add(INodeNo(child), next, file_type(kind), name) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = self.entries_from(fh, ino.0, offset) else {
            return reply.error(Errno::EBADF);
        };
        for (next, name, child, _) in entries {
            let Ok(attr) = self.view.attr(child) else {
                continue;
            };
            if name != "." && name != ".." {
                self.kernel.saw(ino.0, &name, child);
            }
            let a = file_attr(&attr);
            if reply.add(
                INodeNo(child),
                next,
                &name,
                &TTL,
                &a,
                self.kernel.generation(child),
            ) {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().unwrap().remove(&fh.0);
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ds: bool,
        reply: ReplyEmpty,
    ) {
        empty(self.view.fsync(None), reply)
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.view.statfs() {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                255,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        empty(
            self.view
                .setxattr(ino.0, name.as_bytes(), Some(value), flags),
            reply,
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr_reply(self.view.getxattr(ino.0, name.as_bytes()), size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(self.view.listxattr(ino.0), size, reply)
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.view.setxattr(ino.0, name.as_bytes(), None, 0), reply)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(new) = Self::new_node(req, mode, 0) else {
            return reply.error(Errno::EINVAL);
        };
        match self.view.create(parent.0, name, new, None) {
            Ok(a) => {
                self.kernel.saw(parent.0, name, a.ino);
                self.view.opened(a.ino);
                if let Some(p) = &self.passthrough {
                    p.created(a.ino);
                }
                reply.created(
                    &TTL,
                    &file_attr(&a),
                    self.kernel.generation(a.ino),
                    self.kernel
                        .handle(a.ino, flags & libc::O_ACCMODE != libc::O_RDONLY),
                    FopenFlags::FOPEN_KEEP_CACHE,
                )
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(self.view.fallocate(ino.0, offset, length, mode), reply)
    }

    fn destroy(&mut self) {
        if let Err(e) = self.view.sync_all() {
            tracing::error!("final sync of the store failed: {e}");
        }
    }
}
