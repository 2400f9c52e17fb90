//! `umlctl snapshot` and `umlctl resume`.
//!
//! A snapshot runs in a guarded worker process (`__snapshot-worker`, the
//! same binary): if the `umlctl snapshot` that the user started is killed,
//! even with SIGKILL, the worker gets SIGTERM (PR_SET_PDEATHSIG), rolls back
//! and exits: the target runs on untraced and no image is published. Ctrl-C
//! and SIGTERM do the same. The tracer itself being SIGKILLed in the middle
//! of a syscall injection would leave the target's registers altered; the
//! worker makes that window unreachable by a kill of the command.

use crate::exit::{CliError, CliResult, Code};
use crate::output::Output;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// The process to snapshot.
    pub pid: i32,
    /// New directory for the image (created 0700; must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Leave the process running after the snapshot (the default).
    #[arg(long, conflicts_with = "kill")]
    pub leave_running: bool,
    /// Kill the process once the image is safely on disk.
    #[arg(long)]
    pub kill: bool,
    /// Lazy copy-on-write snapshot: stop the process only to write-protect
    /// its memory (milliseconds whatever its size) and save the pages while
    /// it runs; the image is still the instant of the freeze. (With --kill
    /// the snapshot is stop-and-copy.)
    #[arg(long)]
    pub lazy: bool,
    /// Arm write tracking, so that later snapshots can be incremental
    /// (`--parent` this image). A small tracker process holds it until the
    /// process exits.
    #[arg(long)]
    pub track: bool,
    /// Incremental snapshot: store only the pages written since PARENT, the
    /// process's latest tracked snapshot (taken with --track or --parent).
    #[arg(long, value_name = "PARENT")]
    pub parent: Option<PathBuf>,
    /// Snapshot the process and all its descendants, in one instant.
    #[arg(long)]
    pub tree: bool,
    /// What to do with established TCP connections: refuse (the default:
    /// the snapshot fails, naming them) or close (they resume as reset).
    #[arg(long, default_value = "refuse", value_name = "refuse|close")]
    pub tcp_established: String,
}

#[derive(clap::Args, Debug)]
pub struct ResumeArgs {
    /// The image directory written by `umlctl snapshot`.
    pub dir: PathBuf,
    /// Resume with the original pid and thread ids (fails if one is in use).
    /// Always so for a process tree, whose processes know each other's pids.
    #[arg(long)]
    pub same_pid: bool,
    /// What std streams that were pipes or terminals become: inherit (this
    /// command's), null, or a file path (appended to, created 0600).
    #[arg(long, default_value = "inherit", value_name = "inherit|null|PATH")]
    pub stdio: String,
    /// PID namespace: host (the default) or new (a fresh namespace where
    /// every process has its original pid; needs root).
    #[arg(long, default_value = "host", value_name = "host|new")]
    pub pid_ns: String,
    /// Run the process before its memory is loaded: a pager process serves
    /// pages on demand from the image and loads the rest in the background.
    /// The image must stay in place until the pager exits (when every page
    /// is in). Pages are checked against their checksums as they are read.
    #[arg(long)]
    pub lazy: bool,
}

#[derive(clap::Args, Debug)]
pub struct CloneArgs {
    /// The image directory written by `umlctl snapshot` (one process, no
    /// pipes, sockets or shared memory: those clones would share).
    pub dir: PathBuf,
    /// How many clones to start. They share the image's memory until they
    /// write it: ten clones take about the memory of one.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub count: usize,
    /// What std streams that were pipes or terminals become in each clone:
    /// inherit (this command's), null, or a file path (appended to).
    #[arg(long, default_value = "inherit", value_name = "inherit|null|PATH")]
    pub stdio: String,
}

#[derive(clap::Args, Debug)]
pub struct PagerArgs {
    pub dir: PathBuf,
    pub pid: i32,
    /// The process's index in the image (a tree holds several).
    #[arg(default_value_t = 0)]
    pub process: usize,
}

/// Maps engine errors to exit codes.
pub fn engine_error(e: engine::Error) -> CliError {
    use engine::ErrorKind as K;
    let code = match e.kind() {
        K::Target => Code::Target,
        K::Unsupported => Code::Unsupported,
        K::BadImage => Code::BadImage,
        K::Conflict => Code::Conflict,
        K::Interrupted => Code::Interrupted,
        K::Other => Code::Internal,
    };
    CliError::new(code, e.to_string())
}

/// The user-facing command: runs the worker and reports its exit status.
pub fn snapshot(out: Output, a: SnapshotArgs) -> CliResult {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    if out.json {
        cmd.arg("--json");
    }
    for _ in 0..out.verbose {
        cmd.arg("-v");
    }
    cmd.arg("__snapshot-worker")
        .arg(a.pid.to_string())
        .arg("--out")
        .arg(&a.out)
        .env("UMLCTL_PARENT", std::process::id().to_string());
    if a.kill {
        cmd.arg("--kill");
    }
    if a.lazy {
        cmd.arg("--lazy");
    }
    if a.track {
        cmd.arg("--track");
    }
    if let Some(p) = &a.parent {
        cmd.arg("--parent").arg(p);
    }
    if a.tree {
        cmd.arg("--tree");
    }
    cmd.arg("--tcp-established").arg(&a.tcp_established);
    // The worker gets the same Ctrl-C and handles it; we wait for its verdict.
    ignore_signal(libc::SIGINT);
    ignore_signal(libc::SIGTERM);
    let status = cmd.status()?;
    match status.code() {
        Some(0) => Ok(()),
        // The worker already printed the error.
        Some(c) => std::process::exit(c),
        None => Err(CliError::new(
            Code::Internal,
            "the snapshot worker died by a signal",
        )),
    }
}

static CANCEL: AtomicBool = AtomicBool::new(false);

extern "C" fn on_cancel(_: libc::c_int) {
    CANCEL.store(true, Ordering::SeqCst);
}

fn ignore_signal(sig: i32) {
    // SAFETY: SIG_IGN for a catchable signal.
    unsafe { libc::signal(sig, libc::SIG_IGN) };
}

fn guard_worker() {
    // SAFETY: installing an async-signal-safe handler (it only stores an atomic).
    unsafe {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::signal(sig, on_cancel as *const () as libc::sighandler_t);
        }
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
    }
    let parent: Option<i32> = std::env::var("UMLCTL_PARENT")
        .ok()
        .and_then(|p| p.parse().ok());
    // SAFETY: getppid has no preconditions.
    if parent.is_some_and(|p| p != unsafe { libc::getppid() }) {
        CANCEL.store(true, Ordering::SeqCst);
    }
}

#[derive(serde::Serialize)]
struct SnapshotJson {
    dir: PathBuf,
    pid: i32,
    processes: usize,
    threads: usize,
    memory_bytes: u64,
    image_bytes: u64,
    frozen_ms: f64,
    total_ms: f64,
    killed: bool,
    lazy: bool,
    write_faults: u64,
}

/// The worker: performs the snapshot with the engine.
pub fn snapshot_worker(out: Output, a: SnapshotArgs) -> CliResult {
    guard_worker();
    let bar = out.bytes_bar(0, "saving memory");
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let tcp_established_close = match a.tcp_established.as_str() {
        "refuse" => false,
        "close" => true,
        other => {
            return Err(CliError::new(
                Code::Usage,
                format!("--tcp-established {other}: use refuse or close"),
            ))
        }
    };
    let opts = engine::DumpOptions {
        kill: a.kill,
        cancel: Some(&CANCEL),
        progress: Some(&progress),
        lazy: a.lazy,
        parent: a
            .parent
            .as_ref()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
        tracker: (a.track || a.parent.is_some()).then(tracker_process),
        tree: a.tree,
        tcp_established_close,
    };
    let r = engine::dump(a.pid, &a.out, &opts).map_err(engine_error);
    bar.finish_and_clear();
    let r = r?;
    let j = SnapshotJson {
        dir: r.dir.clone(),
        pid: r.pid,
        processes: r.processes,
        threads: r.threads,
        memory_bytes: r.memory_bytes,
        image_bytes: r.image_bytes,
        frozen_ms: r.frozen.as_secs_f64() * 1e3,
        total_ms: r.total.as_secs_f64() * 1e3,
        killed: a.kill,
        lazy: r.lazy,
        write_faults: r.write_faults,
    };
    out.emit(&j, || {
        format!(
            "{}snapshot of pid {} ({} processes, {} threads, {} MiB of memory) in {}: {:.1} ms, stopped {:.1} ms{}",
            if j.lazy { "lazy " } else { "" },
            j.pid,
            j.processes,
            j.threads,
            j.memory_bytes >> 20,
            j.dir.display(),
            j.total_ms,
            j.frozen_ms,
            if j.killed { "; process killed" } else { "" }
        )
    });
    Ok(())
}

fn parse_stdio(s: &str) -> engine::Stdio {
    match s {
        "inherit" => engine::Stdio::Inherit,
        "null" => engine::Stdio::Null,
        path => engine::Stdio::Path(path.to_string()),
    }
}

#[derive(serde::Serialize)]
struct ResumeJson {
    pid: i32,
    tids: Vec<i32>,
    pids: Vec<i32>,
    elapsed_ms: f64,
}

pub fn resume(out: Output, a: ResumeArgs) -> CliResult {
    let new_pid_ns = match a.pid_ns.as_str() {
        "host" => false,
        "new" => true,
        other => {
            return Err(CliError::new(
                Code::Usage,
                format!("--pid-ns {other}: use host or new"),
            ))
        }
    };
    let opts = engine::ResumeOptions {
        same_pid: a.same_pid,
        new_pid_ns,
        stdio: parse_stdio(&a.stdio),
        lazy: a.lazy.then(pager_process),
    };
    let r = engine::resume(&a.dir, &opts).map_err(engine_error)?;
    let j = ResumeJson {
        pid: r.pid,
        tids: r.tids,
        pids: r.pids,
        elapsed_ms: r.elapsed.as_secs_f64() * 1e3,
    };
    out.emit(&j, || j.pid.to_string());
    Ok(())
}

#[derive(serde::Serialize)]
struct CloneJson {
    pids: Vec<i32>,
    clones: Vec<ResumeJson>,
    template_ms: f64,
    elapsed_ms: f64,
}

pub fn clone(out: Output, a: CloneArgs) -> CliResult {
    if a.count == 0 {
        return Err(CliError::new(
            Code::Usage,
            "--count 0: ask for 1 or more clones",
        ));
    }
    let opts = engine::CloneOptions {
        count: a.count,
        stdio: parse_stdio(&a.stdio),
    };
    let r = engine::clone_image(&a.dir, &opts).map_err(engine_error)?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let j = CloneJson {
        pids: r.clones.iter().map(|c| c.pid).collect(),
        clones: r
            .clones
            .into_iter()
            .map(|c| ResumeJson {
                pid: c.pid,
                tids: c.tids,
                pids: c.pids,
                elapsed_ms: ms(c.elapsed),
            })
            .collect(),
        template_ms: ms(r.template),
        elapsed_ms: ms(r.elapsed),
    };
    out.emit(&j, || {
        j.pids
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

/// Starts the pager as `umlctl __pager DIR PID` with the userfaultfd as its
/// fd 3, in a session of its own, so that it outlives this command and
/// holds none of its streams (a caller reading our stdout to its end must
/// not wait for the pager).
fn pager_process() -> engine::PagerLauncher {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    std::sync::Arc::new(|fd: OwnedFd, go: OwnedFd, job: engine::PagerFor| {
        let exe = std::env::current_exe().map_err(|e| engine::Error::io("find umlctl", e))?;
        let log = std::env::var_os("UMLCTL_PAGER_LOG").and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        let mut cmd = Command::new(exe);
        cmd.arg("__pager")
            .arg(job.dir)
            .arg(job.pid.to_string())
            .arg(job.process.to_string());
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        cmd.stderr(log.map_or(std::process::Stdio::null(), std::process::Stdio::from));
        let (raw, raw_go) = (fd.as_raw_fd(), go.as_raw_fd());
        // SAFETY: dup2 and setsid are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // Out of the way first: either may already be 3 or 4.
                let (a, g) = (
                    libc::fcntl(raw, libc::F_DUPFD, 100),
                    libc::fcntl(raw_go, libc::F_DUPFD, 100),
                );
                if a < 0 || g < 0 || libc::dup2(a, 3) < 0 || libc::dup2(g, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(a);
                libc::close(g);
                libc::setsid();
                Ok(())
            });
        }
        cmd.spawn()
            .map_err(|e| engine::Error::io("start the pager", e))?;
        Ok(())
    })
}

/// The pager process: serves the lazily resumed process until it is loaded.
pub fn pager(_out: Output, a: PagerArgs) -> CliResult {
    use std::os::fd::FromRawFd;
    // SAFETY: fds 3 and 4 were set up by pager_process() for us alone.
    let (fd, go) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(3),
            std::os::fd::OwnedFd::from_raw_fd(4),
        )
    };
    let image = engine::Image::open(&a.dir).map_err(engine_error)?;
    let report =
        engine::pager::serve(fd, Some(go), &image, a.pid, a.process).map_err(engine_error)?;
    tracing::info!("pager for pid {}: {report:?}", a.pid);
    Ok(())
}

/// Starts `umlctl __tracker PID` holding the tracking userfaultfd as fd 3,
/// in a session of its own; returns its pid.
fn tracker_process() -> engine::track::TrackerLauncher {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    std::sync::Arc::new(|fd: OwnedFd, pid: i32| {
        let exe = std::env::current_exe().map_err(|e| engine::Error::io("find umlctl", e))?;
        let mut cmd = Command::new(exe);
        cmd.arg("__tracker").arg(pid.to_string());
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let raw = fd.as_raw_fd();
        // SAFETY: fcntl, dup2, close and setsid are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let a = libc::fcntl(raw, libc::F_DUPFD, 100);
                if a < 0 || libc::dup2(a, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(a);
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| engine::Error::io("start the tracker", e))?;
        Ok(child.id() as i32)
    })
}

#[derive(clap::Args, Debug)]
pub struct TrackerArgs {
    pub pid: i32,
}

/// The tracker: holds fd 3 (the tracking userfaultfd) until `pid` exits.
pub fn tracker(_out: Output, a: TrackerArgs) -> CliResult {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: fd 3 was set up by tracker_process() for us alone.
    let _uffd = unsafe { OwnedFd::from_raw_fd(3) };
    // SAFETY: pidfd_open takes no pointers.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, a.pid, 0) };
    if pidfd < 0 {
        return Ok(());
    }
    // SAFETY: the descriptor was just returned to us.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a pidfd polls readable when the process exits.
    while unsafe { libc::poll(&mut p, 1, -1) } == 0 || (p.revents == 0) {}
    engine::track::State::forget(a.pid, std::process::id() as i32);
    Ok(())
}
