//! Snapshot ("dump") of live processes: stop-and-copy, or lazy
//! copy-on-write (`cow`).
//!
//! Flow (DESIGN.md, "how a snapshot flows"): check the target, freeze every
//! thread (of the whole tree with `tree`), collect what /proc and ptrace
//! tell, inject the few syscalls only the target can answer, copy its
//! memory while it is frozen (or write-protect it, release, and copy it
//! while it runs), release (or kill) it, publish the image. Any error or
//! cancellation on the way drops the `Frozen` guards (the targets run on
//! untouched) and the `ImageWriter` (no image directory remains).

use crate::cow::Cow;
use crate::error::{Error, IoContext, Result};
use crate::files;
use crate::image::{
    self, Creds, Image, ImageWriter, Manifest, MmFields, Process, Rseq, Thread, Vma,
};
use crate::inject::{self, Area, Remote, CODE_LEN, SCRATCH_LEN};
use crate::mem::ProcMem;
use crate::memory;
use crate::proc::{self, MapsEntry};
use crate::ptrace::{self, Frozen};
use crate::sys;
use crate::uffd::Uffd;
use nix::sys::ptrace::Options;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How a snapshot is taken.
#[derive(Default)]
pub struct DumpOptions<'a> {
    /// Kill the target once the image is published (it never runs again).
    pub kill: bool,
    /// Set from another thread or a signal handler to abort and roll back.
    pub cancel: Option<&'a AtomicBool>,
    /// Called with (bytes copied, bytes to copy) as memory is saved.
    pub progress: Option<&'a dyn Fn(u64, u64)>,
    /// Snapshot the process and all its descendants (`--tree`).
    pub tree: bool,
    /// Save established TCP connections as reset instead of refusing them.
    pub tcp_established_close: bool,
    /// Lazy copy-on-write snapshot (see `cow`): the target is stopped only
    /// to write-protect its memory, which is saved while it runs. Ignored
    /// with `kill` (a process that is killed need not run on).
    pub lazy: bool,
    /// Incremental snapshot: store only the pages written since this image
    /// (which must be the process's latest tracked snapshot).
    pub parent: Option<PathBuf>,
    /// Arm write tracking for later incremental snapshots (implied by
    /// `parent`): starts a tracker with this, unless one runs already.
    pub tracker: Option<crate::track::TrackerLauncher>,
}

/// What a snapshot did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DumpReport {
    pub dir: PathBuf,
    pub pid: i32,
    /// Processes saved (more than one with `tree`).
    pub processes: usize,
    /// Threads of all of them.
    pub threads: usize,
    /// Bytes of memory stored.
    pub memory_bytes: u64,
    /// Size of pages.img (memory plus deleted files' contents).
    pub image_bytes: u64,
    /// How long the target was stopped.
    pub frozen: Duration,
    /// From the call to the published image.
    pub total: Duration,
    /// Whether the memory was saved lazily while the target ran.
    pub lazy: bool,
    /// Writes of the target that waited for their page to be saved first.
    pub write_faults: u64,
}

/// Snapshots process `pid` into the new directory `out`.
pub fn dump(pid: i32, out: &Path, opts: &DumpOptions) -> Result<DumpReport> {
    if !opts.lazy || opts.kill {
        return dump_once(pid, out, opts, false);
    }
    for attempt in 1..=3 {
        match dump_once(pid, out, opts, true) {
            Err(Error::LazyConflict(why)) => {
                tracing::warn!("lazy snapshot, attempt {attempt}: {why}")
            }
            r => return r,
        }
    }
    tracing::warn!(
        "pid {pid} keeps unmapping memory during lazy snapshots: taking it stop-and-copy"
    );
    dump_once(pid, out, opts, false)
}

fn dump_once(pid: i32, out: &Path, opts: &DumpOptions, lazy: bool) -> Result<DumpReport> {
    let t0 = Instant::now();
    check_target(pid)?;
    let track = tracking_plan(pid, opts, lazy)?;
    let mut writer = ImageWriter::create(out)?;
    if let Some(plan) = &track {
        before_freeze(pid, plan)?;
    }
    let pinned = ptrace::Pinned::near(pid);
    // Asked now, not first while the target is frozen (see `proc::cpus`).
    proc::cpus();
    let prearm = if lazy && !opts.tree {
        Some(prearm(pid)?)
    } else {
        None
    };
    // The target stops as its first thread is seized: count from here.
    let t_frozen = Instant::now();
    let opts_ptrace = Options::PTRACE_O_TRACESYSGOOD | Options::PTRACE_O_TRACECLONE;
    let mut frozen = crate::tree::freeze(pid, opts.tree, opts_ptrace)?;
    let cancelled = || opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    tracing::debug!(
        "froze {} processes in {:?}",
        frozen.len(),
        t_frozen.elapsed()
    );
    let (processes, objects, cows, tracking) = collect_all(
        &mut frozen,
        &mut writer,
        opts,
        &cancelled,
        (lazy, prearm),
        track.as_ref(),
    )?;
    tracing::debug!("processes collected at {:?}", t_frozen.elapsed());
    let threads = frozen.iter().map(|f| f.tids.len()).sum();
    let nprocs = frozen.len();
    if cancelled() {
        return Err(Error::Interrupted);
    }
    let parent = track
        .as_ref()
        .and_then(|t| t.parent.as_ref())
        .map(|p| image::ParentRef {
            dir: p.dir.clone(),
            manifest_sum: p.manifest_sum,
        });
    let parts = (processes, objects.list, objects.pipes, parent);
    if opts.kill {
        // Publish while frozen, then kill: no instruction runs after the instant saved.
        write_staged(track.as_ref(), &writer)?;
        let manifest = manifest(parts, &mut writer)?;
        let dir = writer.finish(&manifest)?;
        let frozen_for = t_frozen.elapsed();
        for f in frozen {
            f.kill()?;
        }
        return Ok(report(
            dir,
            pid,
            (nprocs, threads),
            &manifest,
            frozen_for,
            t0,
            None,
        ));
    }
    for f in frozen.into_iter().rev() {
        f.release()?;
    }
    let frozen_for = t_frozen.elapsed();
    tracing::debug!("released at {frozen_for:?}");
    drop(pinned);
    write_staged(track.as_ref(), &writer)?;
    let write_faults = copy_lazily(cows, &writer, opts, &cancelled)?;
    tracing::debug!("lazy copy done at {:?}", t0.elapsed());
    if cancelled() {
        return Err(Error::Interrupted);
    }
    let manifest = manifest(parts, &mut writer)?;
    let dir = writer.finish(&manifest)?;
    if let Some(t) = tracking {
        t.publish(pid, &dir)?;
    }
    Ok(report(
        dir,
        pid,
        (nprocs, threads),
        &manifest,
        frozen_for,
        t0,
        write_faults,
    ))
}

/// What was collected of the frozen processes: their records, the open file
/// descriptions they hold, the lazy copies to make, the tracking armed.
type Collected = (
    Vec<Process>,
    crate::fds::Objects,
    Vec<Cow>,
    Option<Tracking>,
);

/// Collects every frozen process: fds first (an unsupported one is refused
/// before any memory is copied), then each one's state and memory.
fn collect_all(
    frozen: &mut [Frozen],
    writer: &mut ImageWriter,
    opts: &DumpOptions,
    cancelled: &dyn Fn() -> bool,
    (lazy, mut prearm): (bool, Option<crate::cow::Prearm>),
    track: Option<&TrackPlan>,
) -> Result<Collected> {
    let pids: Vec<i32> = frozen.iter().map(|f| f.pid).collect();
    let mut objects = crate::fds::Objects::new(&pids, opts.tcp_established_close)?;
    let mut fds = Vec::new();
    for &p in &pids {
        fds.push(files::collect(p, writer, &mut objects)?);
    }
    objects.finish()?;
    tracing::debug!("fds collected");
    let mut processes = Vec::new();
    let mut cows = Vec::new();
    let mut tracking = None;
    for (f, fds) in frozen.iter_mut().zip(fds) {
        let pre = prearm.take();
        let (process, taken) = collect(f, fds, writer, opts, cancelled, (lazy, pre), track)?;
        processes.push(process);
        match taken {
            Taken::Cow(c) => cows.push(c),
            Taken::Tracking(t) => tracking = Some(t),
            Taken::Nothing => {}
        }
    }
    Ok((processes, objects, cows, tracking))
}

/// Saves the write-protected memory of the (running) targets; returns the
/// number of writes that waited, or None when nothing was lazy. Each
/// process of a tree is copied by a thread of its own: one copied after
/// another would leave the others' writes waiting for the whole copy.
fn copy_lazily(
    cows: Vec<Cow>,
    writer: &ImageWriter,
    opts: &DumpOptions,
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<u64>> {
    if cows.is_empty() {
        return Ok(None);
    }
    let total: u64 = cows.iter().map(|c| c.bytes_left()).sum();
    let done = std::sync::atomic::AtomicU64::new(0);
    // Progress counts the bytes every copier saved (returns the sum so
    // far); only this thread shows it.
    let counted = |cow_left: &std::sync::atomic::AtomicU64, left: u64| {
        let saved = cow_left.swap(left, Ordering::Relaxed).saturating_sub(left);
        done.fetch_add(saved, Ordering::Relaxed) + saved
    };
    let cancel = opts.cancel;
    let others_cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    let mut cows = cows.into_iter();
    let mut first = cows.next().expect("one");
    std::thread::scope(|s| {
        let others: Vec<_> = cows
            .map(|mut cow| {
                let (counted, others_cancelled) = (&counted, &others_cancelled);
                s.spawn(move || {
                    let left = std::sync::atomic::AtomicU64::new(cow.bytes_left());
                    let count = |l: u64| {
                        counted(&left, l);
                    };
                    let r = cow.run(writer, &count, others_cancelled);
                    let faults = cow.write_faults;
                    cow.disarm();
                    r.map(|()| faults)
                })
            })
            .collect();
        let left = std::sync::atomic::AtomicU64::new(first.bytes_left());
        let progress = |l: u64| {
            let now = counted(&left, l);
            if let Some(p) = opts.progress {
                p(now, total);
            }
        };
        let copied = first.run(writer, &progress, cancelled);
        let mut faults = first.write_faults;
        first.disarm();
        let mut result = copied;
        for h in others {
            match h.join() {
                Ok(Ok(f)) => faults += f,
                Ok(Err(e)) => result = result.and(Err(e)),
                Err(_) => result = result.and(Err(Error::Restore("copier thread panicked".into()))),
            }
        }
        result.map(|()| Some(faults))
    })
}

type Parts = (
    Vec<Process>,
    Vec<image::FileObject>,
    Vec<image::PipeBuffer>,
    Option<image::ParentRef>,
);

fn manifest(parts: Parts, writer: &mut ImageWriter) -> Result<Manifest> {
    let (processes, objects, pipes, parent) = parts;
    Ok(Manifest {
        tool_version: env!("CARGO_PKG_VERSION").into(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .into(),
        xstate_size: processes[0].threads.first().map_or(0, |t| t.xstate.len()),
        pages: writer.pages_info()?,
        processes,
        objects,
        pipes,
        parent,
    })
}

/// A lazy snapshot's first, short stop: the target makes a userfaultfd
/// (taken into ours), then runs on while its memory is write-protected
/// (see `cow::Prearm`); the real freeze only protects again what changed.
fn prearm(pid: i32) -> Result<crate::cow::Prearm> {
    let t = Instant::now();
    let mut frozen = Frozen::freeze(pid, Options::PTRACE_O_TRACESYSGOOD)?;
    let maps = proc::maps(pid)?;
    let mem = ProcMem::open(pid)?;
    let ip = inject::find_syscall_ip(&mem, &frozen.regs[0], &maps)?;
    frozen.touched[0] = true;
    let mut main = Remote::new(pid, ip, frozen.regs[0]);
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let fd = main.check("userfaultfd", libc::SYS_userfaultfd, &[flags])?;
    let taken = crate::uffd::take_fd(pid, fd as i32);
    let closed = main.check("close the target's userfaultfd", libc::SYS_close, &[fd]);
    frozen.intercepted[0] = main.intercepted;
    frozen.release()?;
    tracing::debug!("pre-arm stop took {:?}", t.elapsed());
    let uffd = Uffd::from_fd(taken?);
    closed?;
    let vmas = maps
        .iter()
        .filter(|m| crate::track::trackable(m))
        .map(|m| (m.start, m.end))
        .collect();
    crate::cow::Prearm::start(uffd, pid, vmas)
}

/// Writes the pages an incremental snapshot staged in memory.
fn write_staged(track: Option<&TrackPlan>, writer: &ImageWriter) -> Result<()> {
    match track {
        Some(t) => t.stage.take().write(writer),
        None => Ok(()),
    }
}

/// What a snapshot does about write tracking, decided before the freeze.
struct TrackPlan {
    /// The parent image of an incremental snapshot.
    parent: Option<Image>,
    /// What changed since `parent`, checked against the tracking state.
    delta: Option<crate::track::Delta>,
    /// A tracker already holds this target's tracking userfaultfd.
    state: Option<crate::track::State>,
    launch: Option<crate::track::TrackerLauncher>,
    /// Where an incremental snapshot stages the pages written since its
    /// parent: read before the freeze, and room for the freeze's reads
    /// (`Staged::pre_read`).
    stage: std::cell::RefCell<memory::Staged>,
}

fn tracking_plan(pid: i32, opts: &DumpOptions, lazy: bool) -> Result<Option<TrackPlan>> {
    if opts.parent.is_none() && opts.tracker.is_none() {
        // A VMA takes one userfaultfd: the tracker's holds the memory.
        return match crate::track::State::load(pid) {
            Some(s) if lazy => Err(Error::Unsupported {
                pid,
                what: format!(
                    "is write-tracked for incremental snapshots (tracker pid {}), which a lazy snapshot cannot share: take it without --lazy, or with --parent",
                    s.tracker_pid
                ),
            }),
            _ => Ok(None),
        };
    }
    let no = |what: &str| {
        Err(Error::Unsupported {
            pid,
            what: what.into(),
        })
    };
    if lazy {
        return no("--lazy cannot be combined with --track or --parent yet: take the snapshot stop-and-copy");
    }
    if opts.tree {
        return no("--tree cannot be combined with --track or --parent yet");
    }
    let parent = match &opts.parent {
        Some(dir) => {
            let img = Image::open(dir)?;
            if img.manifest.processes.first().map(|p| p.pid) != Some(pid) {
                return Err(Error::bad_image(
                    dir,
                    format!("is not a snapshot of pid {pid}"),
                ));
            }
            Some(img)
        }
        None => None,
    };
    let delta = match &parent {
        Some(img) => Some(crate::track::Delta::new(pid, img)?),
        None => None,
    };
    Ok(Some(TrackPlan {
        parent,
        delta,
        state: crate::track::State::load(pid),
        launch: opts.tracker.clone(),
        stage: Default::default(),
    }))
}

/// A tracked snapshot's work while the target still runs: the tracking
/// state stops naming the parent (the protection is about to be reset),
/// and an incremental snapshot reads the pages written so far, leaving
/// the freeze only what is written from now on (`Staged::pre_read`).
fn before_freeze(pid: i32, plan: &TrackPlan) -> Result<()> {
    if let Some(state) = plan.state.clone() {
        state.resetting()?;
    }
    if let Some(delta) = &plan.delta {
        plan.stage.borrow_mut().pre_read(pid, delta)?;
    }
    Ok(())
}

/// Tracking armed during a snapshot, to be recorded once it is published.
struct Tracking {
    tracker_pid: i32,
}

impl Tracking {
    fn publish(&self, pid: i32, dir: &Path) -> Result<()> {
        let sum = Image::open(dir)?.manifest_sum;
        let state = crate::track::State {
            pid,
            start_time: crate::track::start_time(pid)?,
            tracker_pid: self.tracker_pid,
            image_sum: sum,
        };
        state.save()
    }
}

/// What `collect` set up besides the process record.
enum Taken {
    Nothing,
    Cow(Cow),
    Tracking(Tracking),
}

/// Arms tracking while frozen: registers and protects every trackable VMA
/// with the tracker's userfaultfd (taken from the running tracker, or the
/// new one the target just made, handed to a new tracker).
fn arm_tracking(
    pid: i32,
    maps: &[MapsEntry],
    plan: &TrackPlan,
    new_fd: Option<std::os::fd::OwnedFd>,
    delta: Option<&crate::track::Delta>,
) -> Result<Tracking> {
    let pagemap =
        std::fs::File::open(format!("/proc/{pid}/pagemap")).ctx(|| "open pagemap".into())?;
    // VMAs the incremental walk protected again need nothing more; new or
    // changed ones are registered and protected whole.
    let vmas: Vec<&MapsEntry> = maps
        .iter()
        .filter(|m| crate::track::trackable(m) && !delta.is_some_and(|d| d.rearmed(m.start)))
        .collect();
    match (&plan.state, new_fd) {
        (Some(state), _) => {
            let uffd = Uffd::from_fd(crate::uffd::take_fd(state.tracker_pid, 3)?);
            crate::track::protect(&uffd, &pagemap, &vmas)?;
            Ok(Tracking {
                tracker_pid: state.tracker_pid,
            })
        }
        (None, Some(fd)) => {
            let uffd = crate::track::new_uffd(fd)?;
            crate::track::protect(&uffd, &pagemap, &vmas)?;
            let launch = plan
                .launch
                .as_ref()
                .ok_or_else(|| Error::Restore("no tracker launcher".into()))?;
            Ok(Tracking {
                tracker_pid: launch(uffd.fd, pid)?,
            })
        }
        (None, None) => Err(Error::Restore("no userfaultfd for tracking".into())),
    }
}

fn report(
    dir: PathBuf,
    pid: i32,
    (processes, threads): (usize, usize),
    m: &Manifest,
    frozen: Duration,
    t0: Instant,
    write_faults: Option<u64>,
) -> DumpReport {
    DumpReport {
        dir,
        pid,
        processes,
        threads,
        memory_bytes: m
            .processes
            .iter()
            .flat_map(|p| &p.vmas)
            .map(|v| v.stored_bytes())
            .sum(),
        image_bytes: m.pages.len,
        frozen,
        total: t0.elapsed(),
        lazy: write_faults.is_some(),
        write_faults: write_faults.unwrap_or(0),
    }
}

/// Refuses targets that cannot be snapshotted, before touching them.
pub fn check_target(pid: i32) -> Result<()> {
    if pid <= 0 {
        return Err(Error::NoSuchProcess(pid));
    }
    if pid as u32 == std::process::id() {
        return Err(Error::Unsupported {
            pid,
            what: "umlctl cannot snapshot itself".into(),
        });
    }
    let st = proc::status(pid)?;
    if st
        .get("State")
        .is_some_and(|s| s.starts_with('Z') || s.starts_with('X'))
    {
        return Err(Error::Zombie(pid));
    }
    let fields = proc::stat_fields(pid)?;
    const PF_KTHREAD: u64 = 0x0020_0000;
    if proc::stat_field(&fields, 9) & PF_KTHREAD != 0 {
        return Err(Error::KernelThread(pid));
    }
    let tracer = proc::status_nums(&st, "TracerPid")
        .first()
        .copied()
        .unwrap_or(0);
    if tracer != 0 {
        return Err(Error::AlreadyTraced {
            pid,
            tracer: tracer as i32,
        });
    }
    if proc::status_nums(&st, "Tgid").first().copied() != Some(pid as u64) {
        return Err(Error::Unsupported {
            pid,
            what: "is a thread, not a process: give the process id (Tgid)".into(),
        });
    }
    Ok(())
}

fn collect(
    frozen: &mut Frozen,
    fds: Vec<crate::image::Fd>,
    writer: &mut ImageWriter,
    opts: &DumpOptions,
    cancelled: &dyn Fn() -> bool,
    (lazy, prearmed): (bool, Option<crate::cow::Prearm>),
    track: Option<&TrackPlan>,
) -> Result<(Process, Taken)> {
    let pid = frozen.pid;
    let maps = proc::maps(pid)?;
    let (ppid, pgid, sid) = crate::tree::ids(pid)?;
    let st = proc::status(pid)?;
    let fields = proc::stat_fields(pid)?;
    let mem = ProcMem::open(pid)?;
    let t = Instant::now();
    let want_uffd = lazy && prearmed.is_none() || track.is_some_and(|t| t.state.is_none());
    let mut injected = inject_queries(frozen, &mem, &maps, &st, want_uffd)?;
    tracing::debug!("injected queries in {:?}", t.elapsed());
    let mut threads = Vec::new();
    for (i, &tid) in frozen.tids.iter().enumerate() {
        let mut t = thread_state(tid, &frozen.regs[i], injected.tid_addresses[i])?;
        t.altstack = injected.altstacks[i];
        threads.push(t);
    }
    if cancelled() {
        return Err(Error::Interrupted);
    }
    let t = Instant::now();
    let delta = track.and_then(|t| t.delta.as_ref());
    let mut stage = track.map(|t| t.stage.borrow_mut());
    let mode = match (lazy, delta, stage.as_deref_mut()) {
        (true, _, _) => memory::Mode::Defer,
        (false, Some(_), Some(s)) => memory::Mode::Stage(s),
        _ => memory::Mode::Copy,
    };
    let armed = prearmed.map(|p| p.stop()).transpose()?;
    let prior = memory::Prior {
        delta,
        armed: armed.as_ref(),
    };
    let saved = memory::dump_vmas(pid, &maps, writer, opts.progress, cancelled, mode, prior)?;
    tracing::debug!("memory planned in {:?}", t.elapsed());
    let taken = match (track, injected.uffd.take()) {
        (Some(plan), fd) => Taken::Tracking(arm_tracking(pid, &maps, plan, fd, delta)?),
        (None, None) if armed.is_some() => {
            let deferred: Vec<&Vma> = saved.deferred.iter().map(|&i| &saved.vmas[i]).collect();
            let (uffd, protect) = armed.expect("checked").finish(&deferred)?;
            Taken::Cow(Cow::arm_with(uffd, pid, &deferred, &protect)?)
        }
        (None, Some(fd)) => {
            let deferred: Vec<&Vma> = saved.deferred.iter().map(|&i| &saved.vmas[i]).collect();
            Taken::Cow(Cow::arm(Uffd::from_fd(fd), pid, &deferred)?)
        }
        (None, None) => Taken::Nothing,
    };
    tracing::debug!("memory saved (or protected) in {:?}", t.elapsed());
    let vmas = saved.vmas;
    let process = Process {
        pid,
        ppid,
        pgid,
        sid,
        comm: proc::read_proc(pid, "comm")?.trim_end().to_string(),
        exe: proc::readlink(&format!("/proc/{pid}/exe"))?
            .to_string_lossy()
            .into(),
        cwd: proc::readlink(&format!("/proc/{pid}/cwd"))?
            .to_string_lossy()
            .into(),
        umask: st
            .get("Umask")
            .and_then(|u| u32::from_str_radix(u, 8).ok())
            .unwrap_or(0o022),
        personality: u64::from_str_radix(proc::read_proc(pid, "personality")?.trim(), 16)
            .unwrap_or(0),
        creds: creds(&st, injected.dumpable),
        rlimits: rlimits(pid)?,
        mm: mm_fields(pid, &fields, injected.brk)?,
        sigactions: injected.sigactions,
        shared_pending: ptrace::pending_signals(pid, true)?
            .iter()
            .map(|s| s.to_vec())
            .collect(),
        threads,
        vmas,
        fds,
        posix_timers: injected.timers,
        itimers: injected.itimers,
    };
    Ok((process, taken))
}

/// What only the target itself can tell.
struct Injected {
    sigactions: Vec<(i32, sys::KernelSigaction)>,
    tid_addresses: Vec<u64>,
    altstacks: Vec<(u64, i32, u64)>,
    brk: u64,
    dumpable: bool,
    /// A userfaultfd of the target's address space, taken into ours (lazy).
    uffd: Option<std::os::fd::OwnedFd>,
    timers: Vec<crate::image::PosixTimer>,
    itimers: Vec<(i32, u64, u64)>,
}

/// Asks the target, in a few batches run from an injection area mapped in
/// it for the occasion: its signal actions, brk, dumpable flag, each
/// thread's clear_child_tid and alternate signal stack; and, for a lazy
/// snapshot, a userfaultfd of its address space.
fn inject_queries(
    frozen: &mut Frozen,
    mem: &ProcMem,
    maps: &[MapsEntry],
    st: &std::collections::BTreeMap<String, String>,
    want_uffd: bool,
) -> Result<Injected> {
    let ip = inject::find_syscall_ip(mem, &frozen.regs[0], maps)?;
    frozen.touched[0] = true;
    let mut main = Remote::new(frozen.tids[0], ip, frozen.regs[0]);
    let area = Area::map(&mut main, mem, None)?;
    let result = query(frozen, mem, &mut main, area, st, want_uffd);
    // Unmapped with a lone syscall: the batch loop cannot unmap itself.
    let unmapped = main.check(
        "munmap the injection area",
        libc::SYS_munmap,
        &[area.addr, CODE_LEN + SCRATCH_LEN],
    );
    frozen.intercepted[0] = main.intercepted;
    let injected = result?;
    unmapped?;
    Ok(injected)
}

fn query(
    frozen: &mut Frozen,
    mem: &ProcMem,
    main: &mut Remote,
    area: Area,
    st: &std::collections::BTreeMap<String, String>,
    want_uffd: bool,
) -> Result<Injected> {
    let caught = proc::status_hex(st, "SigCgt");
    let ignored = proc::status_hex(st, "SigIgn");
    let mut b = area.batch();
    let mut slots = Vec::new();
    for sig in (1..=64i32).filter(|s| caught & (1u64 << (s - 1)) != 0) {
        let slot = b.data(&[0u8; 32])?;
        b.call(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[sig as u64, 0, slot, 8],
        );
        slots.push((sig, slot));
    }
    let brk_at = b.calls_len();
    b.call("brk(0)", libc::SYS_brk, &[0]);
    b.call(
        "prctl(PR_GET_DUMPABLE)",
        libc::SYS_prctl,
        &[libc::PR_GET_DUMPABLE as u64],
    );
    if want_uffd {
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        b.call("userfaultfd", libc::SYS_userfaultfd, &[flags]);
    }
    let (tid_slot, stack_slot) = thread_queries(&mut b)?;
    let timer_queries = crate::timers::stage(&mut b, frozen.pid)?;
    let results = area.run(main, mem, b)?;
    let (timers, itimers) = crate::timers::read(timer_queries, mem)?;
    let mut sigactions = Vec::new();
    for (sig, slot) in slots {
        let w = |i: u64| mem.read_u64(slot + i * 8);
        sigactions.push((
            sig,
            sys::KernelSigaction {
                handler: w(0)?,
                flags: w(1)?,
                restorer: w(2)?,
                mask: w(3)?,
            },
        ));
    }
    for sig in (1..=64i32).filter(|s| ignored & (1u64 << (s - 1)) != 0) {
        sigactions.push((
            sig,
            sys::KernelSigaction {
                handler: 1,
                ..Default::default()
            },
        ));
    }
    let mut tid_addresses = vec![mem.read_u64(tid_slot)?];
    let mut altstacks = vec![read_stack(mem, stack_slot)?];
    for i in 1..frozen.tids.len() {
        frozen.touched[i] = true;
        let mut r = Remote::new(frozen.tids[i], main.ip, frozen.regs[i]);
        let mut b = area.batch();
        let (tid_slot, stack_slot) = thread_queries(&mut b)?;
        let run = area.run(&mut r, mem, b);
        frozen.intercepted[i] = r.intercepted;
        run?;
        tid_addresses.push(mem.read_u64(tid_slot)?);
        altstacks.push(read_stack(mem, stack_slot)?);
    }
    let uffd = if want_uffd {
        let fd = results[brk_at + 2] as i32;
        let taken = crate::uffd::take_fd(frozen.pid, fd)?;
        main.check(
            "close the target's userfaultfd",
            libc::SYS_close,
            &[fd as u64],
        )?;
        Some(taken)
    } else {
        None
    };
    Ok(Injected {
        sigactions,
        tid_addresses,
        altstacks,
        brk: results[brk_at],
        dumpable: results[brk_at + 1] == 1,
        uffd,
        timers,
        itimers,
    })
}

/// Stages the per-thread queries; returns where their answers will be.
fn thread_queries(b: &mut inject::Batch) -> Result<(u64, u64)> {
    let tid_slot = b.data(&[0u8; 8])?;
    let stack_slot = b.data(&[0u8; 24])?;
    b.call(
        "prctl(PR_GET_TID_ADDRESS)",
        libc::SYS_prctl,
        &[sys::PR_GET_TID_ADDRESS as u64, tid_slot],
    );
    b.call("sigaltstack", libc::SYS_sigaltstack, &[0, stack_slot]);
    Ok((tid_slot, stack_slot))
}

fn read_stack(mem: &ProcMem, at: u64) -> Result<(u64, i32, u64)> {
    Ok((
        mem.read_u64(at)?,
        mem.read_u64(at + 8)? as i32,
        mem.read_u64(at + 16)?,
    ))
}

fn thread_state(tid: i32, regs: &ptrace::Regs, clear_child_tid: u64) -> Result<Thread> {
    let rseq = ptrace::rseq_config(tid)?;
    let (robust_list, robust_list_len) = robust_list(tid)?;
    Ok(Thread {
        tid,
        comm: proc::read_proc(tid, "comm")?.trim_end().to_string(),
        regs: regs.into(),
        xstate: ptrace::get_xstate(tid)?,
        sigmask: ptrace::get_sigmask(tid)?,
        rseq: (rseq.rseq_abi_pointer != 0).then_some(Rseq {
            addr: rseq.rseq_abi_pointer,
            len: rseq.rseq_abi_size,
            sig: rseq.signature,
        }),
        clear_child_tid,
        robust_list,
        robust_list_len,
        altstack: (0, libc::SS_DISABLE, 0),
        pending: ptrace::pending_signals(tid, false)?
            .iter()
            .map(|s| s.to_vec())
            .collect(),
        seccomp: crate::seccomp::filters(tid)?,
    })
}

fn robust_list(tid: i32) -> Result<(u64, u64)> {
    let mut head = 0u64;
    let mut len = 0usize;
    // SAFETY: both out pointers are valid for writes.
    let r = unsafe { libc::syscall(libc::SYS_get_robust_list, tid, &mut head, &mut len) };
    nix::errno::Errno::result(r).map_err(|e| Error::sys(format!("get_robust_list {tid}"), e))?;
    Ok((head, len as u64))
}

fn creds(st: &std::collections::BTreeMap<String, String>, dumpable: bool) -> Creds {
    let four = |k: &str| {
        let v = proc::status_nums(st, k);
        std::array::from_fn(|i| v.get(i).copied().unwrap_or(0) as u32)
    };
    Creds {
        uids: four("Uid"),
        gids: four("Gid"),
        groups: proc::status_nums(st, "Groups")
            .iter()
            .map(|&g| g as u32)
            .collect(),
        cap_inheritable: proc::status_hex(st, "CapInh"),
        cap_permitted: proc::status_hex(st, "CapPrm"),
        cap_effective: proc::status_hex(st, "CapEff"),
        cap_bounding: proc::status_hex(st, "CapBnd"),
        cap_ambient: proc::status_hex(st, "CapAmb"),
        no_new_privs: proc::status_nums(st, "NoNewPrivs").first() == Some(&1),
        dumpable,
    }
}

/// Resource limits from /proc/PID/limits (prlimit on another user's
/// process needs CAP_SYS_RESOURCE, which we may not have). Its lines come
/// in RLIMIT_* order.
fn rlimits(pid: i32) -> Result<Vec<(u32, u64, u64)>> {
    let text = proc::read_proc(pid, "limits")?;
    let value = |v: &str| {
        if v == "unlimited" {
            u64::MAX
        } else {
            v.parse().unwrap_or(u64::MAX)
        }
    };
    Ok(text
        .lines()
        .skip(1)
        .take(sys::RLIMIT_NLIMITS as usize)
        .enumerate()
        .filter_map(|(i, l)| {
            let mut cols = l.get(26..)?.split_whitespace();
            Some((i as u32, value(cols.next()?), value(cols.next()?)))
        })
        .collect())
}

fn mm_fields(pid: i32, f: &[String], brk: u64) -> Result<MmFields> {
    let raw =
        std::fs::read(format!("/proc/{pid}/auxv")).ctx(|| format!("read /proc/{pid}/auxv"))?;
    let auxv = raw
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8")))
        .collect();
    let n = |i| proc::stat_field(f, i);
    Ok(MmFields {
        start_code: n(26),
        end_code: n(27),
        start_stack: n(28),
        start_data: n(45),
        end_data: n(46),
        start_brk: n(47),
        brk,
        arg_start: n(48),
        arg_end: n(49),
        env_start: n(50),
        env_end: n(51),
        auxv,
    })
}

/// The image's manifest path inside a directory (for callers that print it).
pub fn manifest_path(dir: &Path) -> PathBuf {
    dir.join(image::MANIFEST_FILE)
}
