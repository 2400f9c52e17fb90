//! Open file descriptions that cannot be reopened by path: pipes and FIFOs,
//! sockets, epoll, eventfd, signalfd, timerfd, memfd.
//!
//! Why a table of objects rather than a kind per fd: two fds (of one process
//! or of several, after fork or dup) may share one open file description,
//! with one offset, one set of flags, one pipe buffer. The dump gives each
//! description an id (kcmp tells which fds share one) and the image's fds
//! refer to ids. The resume creates every object once, in the resumer itself,
//! and parks it at a high fd number before any puppet is forked: each puppet
//! inherits them all and only has to dup3 the ones it needs to their
//! numbers, so sharing comes back by construction, also across a new PID
//! namespace where the puppets could not name the resumer.
//!
//! One module per kind; each has a `dump` (what to save) and a `create`
//! (make it again, in the resumer).

pub mod epoll;
pub mod eventfd;
pub mod memfd;
pub mod pipes;
pub mod signalfd;
pub mod sockets;
pub mod timerfd;

use crate::error::{Error, Result};
use crate::image::{FileObject, ImageWriter, Manifest, ObjectKind, PipeBuffer};
use std::collections::{BTreeMap, HashMap};
use std::fs::FileType;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;

/// One fd being saved, as /proc shows it.
pub struct Target<'a> {
    pub pid: i32,
    pub fd: i32,
    /// The /proc/PID/fd/N link text ("pipe:[123]", "anon_inode:[eventfd]"...).
    pub link: &'a str,
    pub info: &'a BTreeMap<String, String>,
    pub flags: i32,
    pub ft: FileType,
}

impl Target<'_> {
    pub fn proc_path(&self) -> String {
        format!("/proc/{}/fd/{}", self.pid, self.fd)
    }
    pub fn unsupported(&self, what: impl std::fmt::Display) -> Error {
        Error::Unsupported {
            pid: self.pid,
            what: format!("fd {} ({}) {what}", self.fd, self.link),
        }
    }
    /// The inode in brackets of a link such as "socket:[123]".
    pub fn link_ino(&self) -> u64 {
        self.link
            .rsplit_once('[')
            .and_then(|(_, r)| r.trim_end_matches(']').parse().ok())
            .unwrap_or(0)
    }
}

/// The objects of a snapshot, collected fd by fd across its processes.
pub struct Objects {
    pub list: Vec<FileObject>,
    pub pipes: Vec<PipeBuffer>,
    /// (pid, fd, inode, id) of every fd saved as an object so far.
    seen: Vec<(i32, i32, u64, u32)>,
    /// Pipe inode -> (some process of the snapshot reads it, one writes it).
    pipe_ends: HashMap<u64, (bool, bool)>,
    /// Inodes of every socket the snapshot's processes hold.
    sockets: std::collections::HashSet<u64>,
    /// Inodes the snapshot's processes map shared (deleted files among them
    /// must be one object with their mappings).
    mapped: std::collections::HashSet<u64>,
    /// --tcp-established close: save established TCP connections as reset.
    pub tcp_close: bool,
    /// A tree: regular files are objects too, as fork shares their offsets.
    tree: bool,
}

impl Objects {
    pub fn new(pids: &[i32], tcp_close: bool) -> Result<Objects> {
        Ok(Objects {
            list: vec![],
            pipes: vec![],
            seen: vec![],
            pipe_ends: pipes::ends(pids)?,
            sockets: sockets::held(pids)?,
            mapped: shared_mapped(pids)?,
            tcp_close,
            tree: pids.len() > 1,
        })
    }

    /// True if both ends of the pipe behind `link` are held inside the snapshot.
    pub fn inner_pipe(&self, link: &str) -> bool {
        let ino = link
            .strip_prefix("pipe:[")
            .and_then(|r| r.trim_end_matches(']').parse::<u64>().ok());
        ino.and_then(|i| self.pipe_ends.get(&i)) == Some(&(true, true))
    }

    /// True if the socket behind `link` is a unix socket whose peer is held
    /// inside the snapshot (a std stream connected to a parent, say).
    pub fn inner_socket(&self, link: &str) -> bool {
        let ino = link
            .strip_prefix("socket:[")
            .and_then(|r| r.trim_end_matches(']').parse::<u64>().ok());
        ino.and_then(sockets::unix_peer)
            .is_some_and(|peer| self.sockets.contains(&peer))
    }

    /// The object id for this fd, saving the object the first time its open
    /// file description is seen; None if the fd is not of an object kind.
    pub fn object(&mut self, t: &Target, writer: &mut ImageWriter) -> Result<Option<u32>> {
        let is_pipe = t.link.starts_with("pipe:") || t.ft.is_fifo();
        let ino: u64 = t.info.get("ino").and_then(|i| i.parse().ok()).unwrap_or(0);
        // A deleted file that is also mapped shared (UML's guest memory):
        // one memfd for the fd and the mappings.
        let mapped_deleted =
            t.ft.is_file() && t.link.ends_with(" (deleted)") && self.mapped.contains(&ino);
        let shared_file = self.tree
            && (t.ft.is_file() || t.ft.is_dir())
            && t.link.starts_with('/')
            && !t.link.ends_with(" (deleted)")
            && !t.link.starts_with("/memfd:");
        let kind_known = is_pipe
            || shared_file
            || mapped_deleted
            || t.link.starts_with("socket:")
            || t.link.starts_with("/memfd:")
            || matches!(
                t.link,
                "anon_inode:[eventfd]"
                    | "anon_inode:[eventpoll]"
                    | "anon_inode:[signalfd]"
                    | "anon_inode:[timerfd]"
            );
        if !kind_known {
            return Ok(None);
        }
        for &(pid, fd, i, id) in &self.seen {
            if i == ino && same_file(pid, fd, t.pid, t.fd)? {
                self.seen.push((t.pid, t.fd, ino, id));
                return Ok(Some(id));
            }
        }
        let kind = if shared_file {
            ObjectKind::File {
                path: t.link.to_string(),
                pos: t.info.get("pos").and_then(|p| p.parse().ok()).unwrap_or(0),
                id: crate::image::FileId::of(std::path::Path::new(t.link))
                    .map_err(|e| Error::io(format!("stat {}", t.link), e))?,
            }
        } else if is_pipe {
            pipes::dump(t, &mut self.pipes)?
        } else if t.link.starts_with("socket:") {
            ObjectKind::Socket(sockets::dump(t, self.tcp_close)?)
        } else if t.link.starts_with("/memfd:") || mapped_deleted {
            memfd::dump(t, writer)?
        } else {
            match t.link {
                "anon_inode:[eventfd]" => eventfd::dump(t)?,
                "anon_inode:[eventpoll]" => epoll::dump(t)?,
                "anon_inode:[signalfd]" => signalfd::dump(t)?,
                _ => timerfd::dump(t)?,
            }
        };
        let id = self.list.len() as u32;
        self.list.push(FileObject {
            id,
            flags: t.flags & !libc::O_CLOEXEC,
            owner: async_owner(t)?,
            kind,
        });
        self.seen.push((t.pid, t.fd, ino, id));
        Ok(Some(id))
    }
}

impl Objects {
    /// Checks what only the whole snapshot can tell: a connected unix
    /// stream's peer must be in it too.
    pub fn finish(&self) -> Result<()> {
        use crate::image::{Socket, SocketState};
        let socks: Vec<&Socket> = self
            .list
            .iter()
            .filter_map(|o| match &o.kind {
                ObjectKind::Socket(s) => Some(s),
                _ => None,
            })
            .collect();
        for s in &socks {
            let outside = !socks.iter().any(|p| p.ino == s.peer);
            if s.family == libc::AF_UNIX
                && s.state == SocketState::Connected
                && s.stype != libc::SOCK_DGRAM
                && outside
            {
                let (pid, fd, ..) = self
                    .seen
                    .iter()
                    .find(|x| x.2 == s.ino)
                    .copied()
                    .unwrap_or((0, -1, 0, 0));
                return Err(Error::Unsupported {
                    pid,
                    what: format!("fd {fd} (socket:[{}]) is a unix socket connected to a process outside the snapshot: snapshot a common ancestor with --tree, or close the connection", s.ino),
                });
            }
        }
        Ok(())
    }
}

/// Inodes of the shared mappings of the processes.
fn shared_mapped(pids: &[i32]) -> Result<std::collections::HashSet<u64>> {
    let mut out = std::collections::HashSet::new();
    for &pid in pids {
        out.extend(
            crate::proc::maps(pid)?
                .iter()
                .filter(|m| m.shared && m.inode != 0)
                .map(|m| m.inode),
        );
    }
    Ok(out)
}

/// kcmp(KCMP_FILE): do the two fds share one open file description?
fn same_file(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> Result<bool> {
    const KCMP_FILE: i32 = 0;
    // SAFETY: kcmp takes no pointers for KCMP_FILE.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) };
    if r < 0 {
        return Err(Error::sys(
            format!("kcmp fd {fd1} of {pid1} and fd {fd2} of {pid2}"),
            nix::errno::Errno::last(),
        ));
    }
    Ok(r == 0)
}

/// O_ASYNC files: who gets SIGIO (F_GETOWN_EX) and with which signal (F_GETSIG).
fn async_owner(t: &Target) -> Result<Option<(i32, i32, i32)>> {
    if t.flags & libc::O_ASYNC == 0 {
        return Ok(None);
    }
    let f = take(t)?;
    let mut own = crate::sys::FOwnerEx { type_: 0, pid: 0 };
    // SAFETY: F_GETOWN_EX writes one f_owner_ex.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), crate::sys::F_GETOWN_EX, &mut own) };
    // SAFETY: F_GETSIG takes no argument.
    let sig = unsafe { libc::fcntl(f.as_raw_fd(), crate::sys::F_GETSIG) };
    if r < 0 || sig < 0 {
        return Err(t.unsupported("has O_ASYNC but its owner cannot be read"));
    }
    Ok((own.pid != 0).then_some((own.type_, own.pid, sig)))
}

/// A duplicate of the target's fd in this process (pidfd_getfd): the same
/// open file description, to query without injecting anything.
pub fn take(t: &Target) -> Result<OwnedFd> {
    // SAFETY: pidfd_open and pidfd_getfd take no pointers; the results are
    // new descriptors that we own.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, t.pid, 0);
        if pidfd < 0 {
            return Err(Error::sys("pidfd_open", nix::errno::Errno::last()));
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), t.fd, 0);
        if fd < 0 {
            return Err(Error::sys(
                format!("pidfd_getfd fd {} of pid {}", t.fd, t.pid),
                nix::errno::Errno::last(),
            ));
        }
        Ok(OwnedFd::from_raw_fd(fd as i32))
    }
}

/// Turns a libc return value into a Result naming `what`.
pub fn check(r: libc::c_long, what: impl FnOnce() -> String) -> Result<libc::c_long> {
    if r < 0 {
        Err(Error::sys(what(), nix::errno::Errno::last()))
    } else {
        Ok(r)
    }
}

/// Wraps a new descriptor returned by a libc call.
pub fn owned(r: libc::c_int, what: impl FnOnce() -> String) -> Result<OwnedFd> {
    check(r as libc::c_long, what)?;
    // SAFETY: r is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// Sets the file status flags that F_SETFL can change.
pub fn set_status_flags(fd: i32, flags: i32) -> Result<()> {
    let settable = libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_DIRECT;
    // SAFETY: F_SETFL takes an int.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFL, flags & settable) };
    check(r as libc::c_long, || "fcntl(F_SETFL)".into()).map(drop)
}

/// The objects of an image, created in the resumer and parked at numbers
/// from `base` up, where every puppet forked afterwards inherits them.
pub struct Installer {
    pub base: i32,
    local: HashMap<u32, OwnedFd>,
    /// Shared memory objects (by the image's inode) for `VmaKind::Shmem`.
    shm: HashMap<u64, OwnedFd>,
    /// Those of `shm` that are memfd objects, filled (and maybe sealed)
    /// already: their mappings need no filling.
    filled: std::collections::HashSet<u64>,
    /// Objects that must stay open until every puppet has its fds (FIFO holders).
    _keep: Vec<OwnedFd>,
}

impl Installer {
    pub fn create(m: &Manifest, pages: &[u8]) -> Result<Installer> {
        raise_nofile();
        let max_fd = m
            .processes
            .iter()
            .flat_map(|p| p.fds.iter().map(|f| f.fd))
            .max()
            .unwrap_or(0);
        let base = (max_fd + 1).max(64);
        let mut ins = Installer {
            base,
            local: HashMap::new(),
            shm: HashMap::new(),
            filled: Default::default(),
            _keep: vec![],
        };
        let mut made = pipes::create(&m.objects, &m.pipes, &mut ins._keep)?;
        sockets::create_all(&m.objects, &mut made)?;
        for o in &m.objects {
            let fd = match (made.remove(&o.id), &o.kind) {
                (Some(fd), _) => fd,
                (None, ObjectKind::EventFd { count, semaphore }) => {
                    eventfd::create(*count, *semaphore)?
                }
                (None, ObjectKind::Epoll { .. }) => epoll::create()?,
                (None, ObjectKind::SignalFd { mask }) => signalfd::create(*mask)?,
                (None, ObjectKind::TimerFd { .. }) => timerfd::create(&o.kind)?,
                (None, ObjectKind::Memfd { .. }) => memfd::create(&o.kind, pages)?,
                (None, ObjectKind::File { path, pos, .. }) => open_file(path, o.flags, *pos)?,
                (None, _) => {
                    return Err(Error::Restore(format!(
                        "object {} of the image was not created",
                        o.id
                    )))
                }
            };
            set_status_flags(fd.as_raw_fd(), o.flags & !libc::O_ASYNC)?;
            let fd = ins.park(fd)?;
            if let ObjectKind::Memfd { ino, .. } = o.kind {
                if ino != 0 {
                    let map_fd = fd.try_clone().map_err(|e| Error::io("dup memfd", e))?;
                    ins.shm.insert(ino, ins.park(map_fd)?);
                    ins.filled.insert(ino);
                }
            }
            ins.local.insert(o.id, fd);
        }
        Ok(ins)
    }

    /// Moves a descriptor to `base` or above.
    fn park(&self, fd: OwnedFd) -> Result<OwnedFd> {
        // SAFETY: F_DUPFD_CLOEXEC takes an int and returns a new descriptor.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, self.base) };
        owned(r, || format!("move a descriptor above {}", self.base))
    }

    /// The resumer's (and so every puppet's) fd for object `id`.
    pub fn fd(&self, id: u32) -> Result<i32> {
        self.local
            .get(&id)
            .map(|f| f.as_raw_fd())
            .ok_or_else(|| Error::Restore(format!("image fd refers to unknown object {id}")))
    }

    /// A memfd for the shared memory object `ino`, `len` bytes at least,
    /// made on first use (so that every process maps the same one).
    pub fn shm(&mut self, ino: u64, name: &str, len: u64) -> Result<i32> {
        if !self.shm.contains_key(&ino) {
            let fd = memfd::create_empty(name)?;
            let fd = self.park(fd)?;
            self.shm.insert(ino, fd);
        }
        let fd = self.shm[&ino].as_raw_fd();
        if self.filled.contains(&ino) {
            return Ok(fd);
        }
        let cur = nix::sys::stat::fstat(&self.shm[&ino])
            .map_err(|e| Error::sys("fstat memfd", e))?
            .st_size as u64;
        if cur < len {
            nix::unistd::ftruncate(
                // SAFETY: fd stays open in self.shm for the borrow's duration.
                unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                len as i64,
            )
            .map_err(|e| Error::sys("ftruncate shared memory", e))?;
        }
        Ok(fd)
    }

    /// Shared memory must exist before puppets fork: creates the objects of
    /// every shared VMA that several processes map.
    pub fn prepare_shm(&mut self, m: &Manifest) -> Result<()> {
        use crate::image::VmaKind;
        let mut users: HashMap<u64, (usize, String, u64)> = HashMap::new();
        for (i, p) in m.processes.iter().enumerate() {
            for v in &p.vmas {
                if let VmaKind::Shmem {
                    name,
                    offset,
                    object,
                } = &v.kind
                {
                    if *object == 0 || crate::restore::reopens_tmpfs(name) {
                        continue;
                    }
                    let e = users.entry(*object).or_insert((i, name.clone(), 0));
                    e.2 = e.2.max(offset + v.len());
                    if e.0 != i {
                        e.0 = usize::MAX;
                    }
                }
            }
        }
        for (ino, (who, name, len)) in users {
            if who == usize::MAX {
                self.shm(ino, &name, len)?;
            }
        }
        Ok(())
    }

    pub fn has_shm(&self, ino: u64) -> bool {
        self.shm.contains_key(&ino)
    }

    /// True if the shared object `ino` has its contents already.
    pub fn is_filled(&self, ino: u64) -> bool {
        self.filled.contains(&ino)
    }
}

/// Opens a file the image shares between processes, at its offset.
fn open_file(path: &str, flags: i32, pos: u64) -> Result<OwnedFd> {
    let c = std::ffi::CString::new(path).map_err(|_| Error::Restore(format!("bad path {path}")))?;
    let keep = libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_DIRECTORY
        | libc::O_NOATIME
        | libc::O_SYNC
        | libc::O_DSYNC;
    // SAFETY: c is a valid C string.
    let r = unsafe { libc::open(c.as_ptr(), flags & keep | libc::O_CLOEXEC | libc::O_NOCTTY) };
    let fd = owned(r, || format!("open {path}"))?;
    // SAFETY: lseek takes integers.
    unsafe { libc::lseek(fd.as_raw_fd(), pos as i64, libc::SEEK_SET) };
    Ok(fd)
}

/// Objects live above every fd number of the image: allow as many as the
/// hard limit does.
fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: l is a valid rlimit to fill, then to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}
