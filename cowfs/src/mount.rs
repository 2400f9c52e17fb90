//! Mounting a store: the FUSE session, the control socket, and the lock
//! that says "this store is mounted".

use crate::control::{Live, Server};
use crate::disk::Layout;
use crate::error::{Context, Error, Result};
use crate::fuse::{CowFuse, KernelCache};
use crate::view::View;
use fuser::{Config, MountOption, SessionACL};
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// FUSE worker threads.
    pub threads: usize,
    /// Serve read-only opens of files no layer changed from the base file
    /// directly (FUSE passthrough: native read speed), at the price of the
    /// writeback cache (see the `passthrough` module).
    pub passthrough: bool,
    /// How the kernel hands requests to the daemon.
    pub transport: Transport,
    /// With FUSE over io_uring: threads per online CPU, each serving one
    /// request at a time with its own ring entry (about 1 MiB of buffer
    /// each once a big request has used it).
    pub ring_threads: usize,
}

/// Ring threads per online CPU by default: the kernel hands a CPU's
/// writeback several requests at once and a slow one (an fsync) must not
/// hold up the rest; with 2, sequential writes ran ~20% slower than over
/// /dev/fuse with 4 threads, with 4 as fast (2 CPUs here). On a host with
/// many CPUs and many mounts, fewer save threads and memory.
pub const DEFAULT_RING_THREADS: usize = 4;

/// How the kernel hands requests to the daemon.
///
/// FUSE over io_uring keeps one request queue per CPU, each served by
/// threads pinned to that CPU, so a request and its reply never wake
/// another CPU (see fuser's `ring.rs`). Over /dev/fuse a request wakes a
/// daemon thread wherever it sleeps: on this VM, whose idle vCPUs halt at
/// once, each round trip then pays for waking a halted CPU (~35-40 us).
/// Metadata-heavy work is 2-3x faster over io_uring (`umlctl bench fs`,
/// 2026-11-28: create 10k files 2.21x native against 7.75x, cold stat of
/// 10k base files 2.84x against 6.04x); bulk data is a little slower,
/// since the daemon's work runs on the caller's CPU instead of beside it
/// (sequential write 0.98-1.01x native against 1.12-1.23x), and both
/// meet their targets. Hence `Auto` by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// FUSE over io_uring when the kernel offers it (Linux 6.14+ with
    /// `/sys/module/fuse/parameters/enable_uring` set to Y), else
    /// /dev/fuse.
    #[default]
    Auto,
    /// FUSE over io_uring; the mount fails if the kernel does not offer it.
    IoUring,
    /// /dev/fuse only.
    DevFuse,
}

impl Transport {
    /// What a mount asks the kernel for: `Auto` becomes `IoUring` where
    /// the kernel offers it, else `DevFuse`.
    pub fn resolved(self) -> Transport {
        self.resolve(fuser::io_uring_available())
    }

    fn resolve(self, io_uring_available: bool) -> Transport {
        match self {
            Transport::Auto if io_uring_available => Transport::IoUring,
            Transport::Auto => Transport::DevFuse,
            other => other,
        }
    }

    /// Whether to ask the kernel for FUSE over io_uring.
    pub(crate) fn wants_io_uring(self) -> bool {
        self.resolved() == Transport::IoUring
    }
}

/// Worker threads by default. More made one process's cold stats faster
/// here (10k of them: 1 thread 0.67-0.71 s, 4: 0.36-0.41, 8: 0.30-0.31,
/// 16: 0.27-0.29), but checkpoint and rollback slower (8 threads: 0.85-1.29
/// ms and 3.5-6.5 ms; 4: 0.36-1.14 ms and 3.2-5.2 ms), whose targets 4 meet.
pub const DEFAULT_THREADS: usize = 4;

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: DEFAULT_THREADS,
            passthrough: false,
            transport: Transport::Auto,
            ring_threads: DEFAULT_RING_THREADS,
        }
    }
}

/// The kernel's switch for FUSE over io_uring.
pub const URING_SWITCH: &str = "/sys/module/fuse/parameters/enable_uring";

/// Hold the store's lock; `Conflict` if another process holds it.
pub fn lock(layout: &Layout) -> Result<Option<Flock<File>>> {
    let path = layout.lock();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .at("open", &path)?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e).at("lock", &path),
    }
}

/// The mountinfo line of the mount at `path`, split in fields.
fn mountinfo(path: &Path) -> Option<Vec<String>> {
    let canon = path.canonicalize().ok()?;
    let canon = canon.to_string_lossy();
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .rev()
        .find(|l| l.split(' ').nth(4).is_some_and(|m| unescape(m) == canon))
        .map(|l| l.split(' ').map(unescape).collect())
}

/// Whether `path` is a mountpoint now.
pub fn is_mountpoint(path: &Path) -> bool {
    mountinfo(path).is_some()
}

/// The kernel keeps a FUSE mount's dirty pages until its dirty thresholds
/// (gigabytes on a big machine) or an fsync: a big write + fsync then
/// passes all its data through FUSE only at the fsync, and the disk waits
/// for it. A strict limit of its own makes the kernel send dirty pages as
/// they pile up, so that FUSE, the daemon and the disk work at the same
/// time (1 GiB + fsync: 0.9 s instead of 1.3 s here; 64 MiB was the best
/// of 64/256/1024 MiB, and random 4 KiB writes do not suffer from it).
/// Root only; without it the mount still works, only slower.
const DIRTY_LIMIT: u64 = 64 << 20;

fn tune_writeback(mountpoint: &Path) {
    let Some(dev) = mountinfo(mountpoint).and_then(|f| f.get(2).cloned()) else {
        return;
    };
    let bdi = PathBuf::from("/sys/class/bdi").join(dev);
    for (knob, value) in [
        ("strict_limit", "1".to_string()),
        ("max_bytes", DIRTY_LIMIT.to_string()),
    ] {
        if let Err(e) = std::fs::write(bdi.join(knob), value) {
            tracing::info!("cannot set {}/{knob}: {e}", bdi.display());
        }
    }
}

/// Unmount a cowfs mount (of any process) and wait until its daemon has
/// made everything durable and let go of the store.
pub fn unmount(mountpoint: &Path) -> Result<()> {
    let fields = mountinfo(mountpoint)
        .ok_or_else(|| Error::NotFound(format!("{} is not mounted", mountpoint.display())))?;
    // After " - ": fstype, source.
    let dash = fields.iter().position(|f| f == "-").unwrap_or(fields.len());
    let source = fields.get(dash + 2).cloned().unwrap_or_default();
    let Some(store) = source.strip_prefix("cowfs:") else {
        return Err(Error::Invalid(format!(
            "{} is not a cowfs mount (source {source:?})",
            mountpoint.display()
        )));
    };
    // References that are being dropped (a close in flight) make the mount
    // busy for a moment: retry briefly before calling it busy.
    let mut tries = 0;
    loop {
        match nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
            Ok(()) => break,
            Err(nix::errno::Errno::EBUSY) if tries < 40 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(nix::errno::Errno::EBUSY) => {
                return Err(Error::Conflict(format!(
                    "{} is busy (open files or a process inside); close them and retry",
                    mountpoint.display()
                )))
            }
            Err(e) => return Err(e).at("unmount", mountpoint),
        }
    }
    let layout = Layout {
        dir: PathBuf::from(store),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if !layout.lock().exists() || lock(&layout)?.is_some() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(Error::Conflict(format!(
        "the daemon of {store} did not finish within 60 s after unmounting"
    )))
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Everything a live mount holds; shared by `Mount` and `serve`.
pub(crate) struct Prepared {
    pub session: fuser::Session<CowFuse>,
    pub server: Server,
    pub view: Arc<View>,
    pub lock: Flock<File>,
    pub mountpoint: PathBuf,
}

/// What can be checked before the store is loaded: the mountpoint and the
/// kernel. Loading starts background work (the spare layer) that a failed
/// mount would otherwise leave changing the store.
pub(crate) fn check(mountpoint: &Path, opts: &MountOptions) -> Result<()> {
    let md = std::fs::metadata(mountpoint).map_err(|e| {
        Error::NotFound(format!(
            "mountpoint {} is not usable: {e}",
            mountpoint.display()
        ))
    })?;
    if !md.is_dir() {
        return Err(Error::Invalid(format!(
            "mountpoint {} is not a directory",
            mountpoint.display()
        )));
    }
    if is_mountpoint(mountpoint) {
        return Err(Error::Conflict(format!(
            "mountpoint {} is in use; unmount it first (`umlctl fs umount {}`)",
            mountpoint.display(),
            mountpoint.display()
        )));
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(Error::Environment(
            "/dev/fuse is missing: load the fuse module (modprobe fuse)".into(),
        ));
    }
    if opts.transport == Transport::IoUring && !fuser::io_uring_available() {
        return Err(Error::Environment(format!(
            "FUSE over io_uring is off in this kernel: turn it on with \
             `echo Y > {URING_SWITCH}` (Linux 6.14 or later), or mount with \
             the transport auto or dev-fuse"
        )));
    }
    Ok(())
}

/// Mount `view` (its store checked by `check`). On failure, the view's
/// background work is ended before the store lock goes.
pub(crate) fn prepare(
    layout: &Layout,
    view: View,
    lock: Flock<File>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<Prepared> {
    let view = Arc::new(view);
    match start_session(layout, &view, mountpoint, opts) {
        Ok((session, server)) => Ok(Prepared {
            session,
            server,
            view,
            lock,
            mountpoint: mountpoint.to_owned(),
        }),
        Err(e) => {
            view.background.stop();
            drop(lock);
            Err(e)
        }
    }
}

fn start_session(
    layout: &Layout,
    view: &Arc<View>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<(fuser::Session<CowFuse>, Server)> {
    crate::sys::raise_nofile_limit();
    let kernel = Arc::new(KernelCache::default());
    let fs = CowFuse::new(view.clone(), kernel.clone(), opts);
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(format!("cowfs:{}", layout.dir.display())),
        MountOption::Subtype("cowfs".into()),
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
        MountOption::RW,
    ];
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(opts.threads.max(1));
    cfg.ring_threads = Some(opts.ring_threads.max(1));
    cfg.clone_fd = true;
    let session = fuser::Session::new(fs, mountpoint, &cfg).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            " (mounting FUSE needs root)"
        } else {
            ""
        };
        Error::Environment(format!(
            "cannot mount on {}: {e}{hint}",
            mountpoint.display()
        ))
    })?;
    let fuse_fd = {
        use std::os::fd::AsFd;
        session
            .as_fd()
            .try_clone_to_owned()
            .ctx(|| "duplicate the /dev/fuse descriptor".into())?
    };
    tune_writeback(mountpoint);
    kernel.set_notifier(session.notifier());
    let live = Live {
        fuse_fd,
        view: view.clone(),
        kernel,
        notifier: session.notifier(),
        mountpoint: mountpoint.to_owned(),
    };
    let server = Server::start(&layout.socket(), live)?;
    crate::merge::spawn(view.clone());
    // Layers dropped by an offline rollback wait in the trash.
    let l = layout.clone();
    view.background
        .spawn("cowfs-trash", move || l.empty_trash());
    Ok((session, server))
}

/// A store mounted by this process, served by background threads.
/// Dropping it unmounts the file system and makes everything durable.
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    server: Option<Server>,
    view: Arc<View>,
    _lock: Flock<File>,
    mountpoint: PathBuf,
}

impl Mount {
    pub(crate) fn start(p: Prepared) -> Result<Mount> {
        let Prepared {
            mut session,
            server,
            view,
            lock,
            mountpoint,
        } = p;
        let (ready, started) = std::sync::mpsc::channel();
        session.on_ready(move || {
            let _ = ready.send(());
        });
        let session = session.spawn().ctx(|| "start the FUSE session".into())?;
        // Answer once requests are served at full speed (with io_uring:
        // every ring entry registered); a session that ended at once
        // drops the sender, and unmounting reports why.
        let _ = started.recv();
        Ok(Mount {
            session: Some(session),
            server: Some(server),
            view,
            _lock: lock,
            mountpoint,
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmount now and report errors (dropping does the same, silently).
    pub fn unmount(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        self.server.take();
        if let Some(s) = self.session.take() {
            s.umount_and_join()
                .ctx(|| format!("unmount {}", self.mountpoint.display()))?;
        }
        self.view.background.stop();
        self.view.sync_all()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!("{e}");
        }
    }
}

/// Serve a mount in this thread until it is unmounted (`umount`).
pub(crate) fn run(p: Prepared, ready: impl FnOnce() + Send + 'static) -> Result<()> {
    let Prepared {
        mut session,
        server,
        view,
        lock,
        ..
    } = p;
    session.on_ready(ready);
    let r = session.run().ctx(|| "FUSE session".into());
    drop(server);
    view.background.stop();
    view.sync_all()?;
    drop(lock);
    r
}

#[cfg(test)]
mod tests {
    use super::Transport;

    #[test]
    fn auto_takes_io_uring_only_where_the_kernel_offers_it() {
        assert_eq!(Transport::Auto.resolve(true), Transport::IoUring);
        assert_eq!(Transport::Auto.resolve(false), Transport::DevFuse);
        // An explicit choice stands: io_uring then fails the mount with
        // the switch to turn on (see `check`).
        assert_eq!(Transport::IoUring.resolve(false), Transport::IoUring);
        assert_eq!(Transport::DevFuse.resolve(true), Transport::DevFuse);
        assert_eq!(Transport::default(), Transport::Auto);
    }
}
