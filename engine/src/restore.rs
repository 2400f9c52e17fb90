//! Resume: rebuild a process from an image inside a puppet (see `puppet`).
//!
//! Order matters: the puppet's own memory goes first, then the image's
//! memory is mapped and filled, then files, process attributes, mm fields
//! and threads are set up while the puppet still has root's privileges;
//! each thread then drops to the image's credentials, pending signals are
//! queued, the scratch pages vanish and every thread gets its registers
//! back. A failure at any step kills the puppet: nothing half-built runs.

use crate::error::{Error, Result};
use crate::files::{self, Stdio};
use crate::image::{Image, Process, Thread, Vma, VmaKind};
use crate::inject::Remote;
use crate::mem;
use crate::proc::{self, PAGE_SIZE};
use crate::ptrace;
use crate::puppet::{Batch, Puppet, CODE_LEN, SCRATCH_LEN};
use crate::sys;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
pub struct ResumeOptions {
    /// Give the process (and its threads) their original ids; fails if taken.
    pub same_pid: bool,
    /// Resume into a new PID namespace, where the processes have their
    /// original pids (so a clone never collides with its original).
    pub new_pid_ns: bool,
    pub stdio: Stdio,
    /// Lazy resume: the process runs before its memory is in; this starts
    /// the pager (`pager::serve`) on the userfaultfd, for the given pid. It
    /// must return once the pager runs (in a thread or another process):
    /// the rest of the resume already faults on lazy memory.
    pub lazy: Option<PagerLauncher>,
}

/// Starts a pager: (userfaultfd, "go" pipe, what it serves). The pipe
/// reads end-of-file once the process runs (see `pager::serve`).
pub type PagerLauncher =
    std::sync::Arc<dyn Fn(OwnedFd, OwnedFd, PagerFor) -> Result<()> + Send + Sync>;

/// What one pager serves: process `process` (its index in the image) of the
/// image in `dir`, resumed as `pid`.
#[derive(Clone, Copy, Debug)]
pub struct PagerFor<'a> {
    pub dir: &'a Path,
    pub pid: i32,
    pub process: usize,
}

impl std::fmt::Debug for ResumeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeOptions")
            .field("same_pid", &self.same_pid)
            .field("new_pid_ns", &self.new_pid_ns)
            .field("stdio", &self.stdio)
            .field("lazy", &self.lazy.is_some())
            .finish()
    }
}

/// A pager launcher that serves from a thread of this process (for library
/// users whose process outlives the resumed one's loading).
pub fn pager_thread() -> PagerLauncher {
    std::sync::Arc::new(|fd: OwnedFd, go: OwnedFd, job: PagerFor| {
        let (dir, pid, process) = (job.dir.to_path_buf(), job.pid, job.process);
        // The image is opened in the thread: its manifest (with a checksum
        // per MiB) takes a few ms to read, which the resume need not wait
        // for; faults wait for the pager anyway.
        std::thread::spawn(move || {
            let served = Image::open(&dir)
                .and_then(|image| crate::pager::serve(fd, Some(go), &image, pid, process));
            if let Err(e) = served {
                tracing::error!("pager for pid {pid}: {e}");
            }
        });
        Ok(())
    })
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ResumeReport {
    /// The root process (as this host's PID namespace numbers it).
    pub pid: i32,
    /// The root's threads.
    pub tids: Vec<i32>,
    /// Every process resumed, root first, in image order.
    pub pids: Vec<i32>,
    pub elapsed: Duration,
}

/// Resumes the image in `dir` (one process or a tree); returns once every
/// process runs on its own.
pub fn resume(dir: &Path, opts: &ResumeOptions) -> Result<ResumeReport> {
    let t0 = Instant::now();
    // The puppets inherit the pin: they and we ping-pong through ptrace on
    // one CPU, away from the pager starting on another (a 4 GiB lazy
    // resume took 3.5-3.8 ms so, 5-25 ms when spread). Unpinned before
    // they run.
    let _pinned = crate::ptrace::Pinned::here();
    let img = Image::open(dir)?;
    let ancestors = img.ancestors()?;
    if opts.lazy.is_some() {
        // Each chunk is checked when the pager first reads it.
        img.verify_index()?;
        for a in &ancestors {
            a.verify_index()?;
        }
    } else {
        img.verify_pages()?;
        for a in &ancestors {
            a.verify_pages()?;
        }
    }
    let ancestor_pages = ancestors
        .iter()
        .map(|a| a.pages())
        .collect::<Result<Vec<_>>>()?;
    let procs = &img.manifest.processes;
    if procs.is_empty() {
        return Err(Error::bad_image(dir, "holds no process"));
    }
    // Processes of a tree know each other's pids (a parent waits for its
    // child by pid): they keep them, here or in a new PID namespace.
    let same_pid = opts.same_pid || opts.new_pid_ns || procs.len() > 1;
    for process in procs {
        precheck(dir, process, opts, same_pid)?;
    }
    let pages = img.pages()?;
    tracing::debug!("resume: image checked in {:?}", t0.elapsed());
    // Objects first: every puppet forked from here on inherits them.
    let mut installer = crate::fds::Installer::create(&img.manifest, &pages)?;
    installer.prepare_shm(&img.manifest)?;
    let root = if opts.new_pid_ns {
        // Its init reaps for the life of the namespace: never pinned.
        crate::ptrace::while_unpinned(|| crate::pidns::spawn(procs[0].pid))?
    } else {
        Puppet::spawn(same_pid.then_some(procs[0].pid))?
    };
    tracing::debug!("resume: puppet ready at {:?}", t0.elapsed());
    let root_pid = root.pid;
    let mut made = vec![root_pid];
    let common = Common {
        dir,
        pages: &pages,
        ancestors: &ancestor_pages,
        opts,
        same_pid,
        objects: &img.manifest.objects,
    };
    let result = build_all(root, procs, &common, &mut installer, &mut made);
    match result {
        Ok((pids, all_tids)) => Ok(ResumeReport {
            pid: root_pid,
            tids: all_tids.into_iter().next().unwrap_or_default(),
            pids,
            elapsed: t0.elapsed(),
        }),
        Err(e) => {
            for &pid in made.iter().rev() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(e)
        }
    }
}

/// Forks the puppets of every process from `root`, builds each and lets
/// them all run; returns their pids and each one's thread ids. `made`
/// collects every puppet, to be killed if anything fails.
fn build_all(
    root: Puppet,
    procs: &[Process],
    common: &Common,
    installer: &mut crate::fds::Installer,
    made: &mut Vec<i32>,
) -> Result<(Vec<i32>, Vec<Vec<i32>>)> {
    let mut puppets = crate::tree::spawn_children(root, procs, common.same_pid, made)?;
    crate::tree::set_groups(&mut puppets, procs)?;
    let pids: HashMap<i32, i32> = procs
        .iter()
        .zip(&puppets)
        .map(|(a, b)| (a.pid, b.pid))
        .collect();
    let mut all_tids = Vec::new();
    let mut pager_go = Vec::new();
    for (index, (p, process)) in puppets.iter_mut().zip(procs).enumerate() {
        let ctx = Context {
            index,
            dir: common.dir,
            pages: common.pages,
            opts: common.opts,
            same_pid: common.same_pid,
            installer,
            objects: common.objects,
            pids: &pids,
            ancestors: common.ancestors,
        };
        let (tids, go) = build(p, process, ctx)?;
        all_tids.push(tids);
        pager_go.push(go);
    }
    crate::ptrace::unpin_threads(all_tids.iter().flatten().copied())?;
    for (process, tids) in procs.iter().zip(&all_tids).rev() {
        start(process, tids)?;
    }
    // Closing the "go" pipes tells the pagers the processes run.
    drop(pager_go);
    Ok((puppets.iter().map(|p| p.pid).collect(), all_tids))
}

/// What every process of an image is built from.
struct Common<'a> {
    dir: &'a Path,
    pages: &'a [u8],
    ancestors: &'a [crate::image::Pages],
    opts: &'a ResumeOptions,
    same_pid: bool,
    objects: &'a [crate::image::FileObject],
}

/// What building one process of an image needs besides its puppet.
pub(crate) struct Context<'a> {
    /// The process's index in the image.
    pub index: usize,
    pub dir: &'a Path,
    pub pages: &'a [u8],
    pub opts: &'a ResumeOptions,
    pub same_pid: bool,
    pub installer: &'a mut crate::fds::Installer,
    pub objects: &'a [crate::image::FileObject],
    pub pids: &'a HashMap<i32, i32>,
    /// pages.img of the parent images of an incremental image, parent first.
    pub ancestors: &'a [crate::image::Pages],
}

/// Is `pid` used? A process killed by `snapshot --kill` may linger a moment
/// as a zombie until its parent reaps it (init here takes a second or
/// more): wait for that, up to 5 s.
fn pid_taken(pid: i32) -> bool {
    let t0 = Instant::now();
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        // A zombie, or a process on its way out (PF_EXITING in the flags,
        // field 9: a killed process takes a moment to tear its memory down).
        const PF_EXITING: u64 = 0x4;
        let dying = state.as_deref().is_some_and(|s| {
            let st = s.rsplit(')').next().unwrap_or("").trim_start();
            let flags: u64 = st
                .split_whitespace()
                .nth(6)
                .and_then(|f| f.parse().ok())
                .unwrap_or(0);
            st.starts_with('Z') || st.starts_with('X') || flags & PF_EXITING != 0
        });
        if state.is_none() {
            return false;
        }
        if !dying || t0.elapsed() > Duration::from_secs(5) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Checks that the image can be resumed here, before any process is made.
pub(crate) fn precheck(
    dir: &Path,
    process: &Process,
    opts: &ResumeOptions,
    same_pid: bool,
) -> Result<()> {
    for v in &process.vmas {
        if let VmaKind::File { path, id, .. } = &v.kind {
            if crate::image::FileId::of(Path::new(path)).ok().as_ref() != Some(id) {
                return Err(Error::FileChanged { path: path.clone() });
            }
        }
    }
    let host_xstate = ptrace::get_xstate_size();
    if let Some(t) = process.threads.first() {
        if t.xstate.len() != host_xstate {
            return Err(Error::bad_image(
                dir,
                format!("its CPU state is {} bytes but this host's is {host_xstate}: resume it on a host with the same CPU features", t.xstate.len()),
            ));
        }
    }
    if same_pid && !opts.new_pid_ns {
        for t in &process.threads {
            if pid_taken(t.tid) {
                return Err(Error::PidInUse(t.tid));
            }
        }
    }
    Ok(())
}

/// Builds one process in its puppet, up to (not including) letting it run;
/// returns its thread ids and, for a lazy resume, the pager's "go" pipe.
fn build(
    p: &mut Puppet,
    process: &Process,
    mut ctx: Context,
) -> Result<(Vec<i32>, Option<OwnedFd>)> {
    build_memory(p, process, &mut ctx)?;
    // Closed once the process runs: the pager's go signal.
    let go = match &ctx.opts.lazy {
        Some(launch) => {
            let job = PagerFor {
                dir: ctx.dir,
                pid: p.pid,
                process: ctx.index,
            };
            Some(arm_pager(p, process, launch, job)?)
        }
        None => None,
    };
    let tids = build_rest(p, process, ctx)?;
    Ok((tids, go))
}

/// The first half of a build: the puppet's own memory goes, the image's
/// memory is mapped and (unless lazy) filled. A clone template stops here.
pub(crate) fn build_memory(p: &mut Puppet, process: &Process, ctx: &mut Context) -> Result<()> {
    let t = Instant::now();
    prepare(p, &process.vmas)?;
    place_specials(p, &process.vmas)?;
    map_memory(
        p,
        &process.vmas,
        (ctx.pages, ctx.ancestors),
        ctx.opts.lazy.is_some(),
        ctx.installer,
    )?;
    tracing::debug!("resume: memory mapped in {:?}", t.elapsed());
    Ok(())
}

/// The second half of a build, on a puppet whose memory is in place: files,
/// attributes, mm fields, threads and their credentials, timers, filters;
/// the scratch pages go last. Returns the thread ids, image order.
pub(crate) fn build_rest(p: &mut Puppet, process: &Process, ctx: Context) -> Result<Vec<i32>> {
    let t = Instant::now();
    let lap = |what: &str| tracing::debug!("resume: {what} done at {:?}", t.elapsed());
    files::restore(
        p,
        process,
        ctx.objects,
        ctx.installer,
        ctx.pages,
        &ctx.opts.stdio,
        ctx.pids,
    )?;
    process_attributes(p, process)?;
    lap("files and attributes");
    set_mm(p, process)?;
    let mut remotes = create_threads(p, &process.threads, ctx.same_pid)?;
    lap("mm and threads");
    let tids: Vec<i32> = std::iter::once(p.pid)
        .chain(remotes.iter().map(|r| r.tid))
        .collect();
    for (i, t) in process.threads.iter().enumerate() {
        patch_tid(&p.mem, t, tids[i])?;
    }
    // Other threads first: the main thread may make the mm non-dumpable.
    for (i, t) in process.threads.iter().enumerate().skip(1) {
        let b = thread_batch(p, process, t, tids[i])?;
        p.run_in(&mut remotes[i - 1], b)?;
    }
    let mut b = thread_batch(p, process, &process.threads[0], p.pid)?;
    for info in &process.shared_pending {
        let signo = i32::from_ne_bytes(info[..4].try_into().expect("siginfo"));
        let addr = b.data(info)?;
        b.call(
            "rt_sigqueueinfo",
            libc::SYS_rt_sigqueueinfo,
            &[p.pid as u64, signo as u64, addr],
        );
    }
    p.run(b)?;
    clocks_and_filters(p, process, &mut remotes, &tids)?;
    p.sys(
        "munmap the restorer's pages",
        libc::SYS_munmap,
        &[p.area, CODE_LEN + SCRATCH_LEN],
    )?;
    lap("built");
    Ok(tids)
}

/// The last steps before the scratch pages go: timers are armed (so that
/// they tick from now), then seccomp filters are installed (so that nothing
/// before them is filtered; they act once the threads are detached).
fn clocks_and_filters(
    p: &mut Puppet,
    process: &Process,
    remotes: &mut [Remote],
    tids: &[i32],
) -> Result<()> {
    let tid_map: HashMap<i32, i32> = process
        .threads
        .iter()
        .map(|t| t.tid)
        .zip(tids.iter().copied())
        .collect();
    let scratch = p.scratch();
    crate::timers::restore(
        &mut p.main,
        &p.mem,
        scratch,
        &process.posix_timers,
        &process.itimers,
        &tid_map,
    )?;
    if process.threads.iter().any(|t| !t.seccomp.is_empty()) {
        // Last: filters, suspended (for this and every later injection)
        // until the threads are detached.
        for &tid in tids {
            crate::seccomp::suspend(tid)?;
        }
        for (i, t) in process.threads.iter().enumerate() {
            let r = if i == 0 {
                &mut p.main
            } else {
                &mut remotes[i - 1]
            };
            crate::seccomp::install(r, &p.mem, scratch, &t.seccomp)?;
        }
    }
    Ok(())
}

/// Gives every thread its registers back and lets the process run.
pub(crate) fn start(process: &Process, tids: &[i32]) -> Result<()> {
    for (i, t) in process.threads.iter().enumerate().rev() {
        let tid = tids[i];
        ptrace::setregs(tid, &ptrace::restartable(t.regs.to_user_regs()))?;
        ptrace::set_xstate(tid, &t.xstate)?;
        ptrace::set_sigmask(tid, t.sigmask)?;
    }
    for &tid in tids.iter().rev() {
        ptrace::detach(tid, 0)?;
    }
    Ok(())
}

/// Unregisters the puppet's rseq, blocks its signals, moves injection to a
/// private code page and removes every mapping the puppet came with.
fn prepare(p: &mut Puppet, image_vmas: &[Vma]) -> Result<()> {
    ptrace::set_sigmask(p.pid, !0)?;
    let own = proc::maps(p.pid)?;
    let mut busy: Vec<(u64, u64)> = own.iter().map(|m| (m.start, m.end)).collect();
    busy.extend(image_vmas.iter().map(|v| (v.start, v.end)));
    let area = find_gap(&busy, CODE_LEN + SCRATCH_LEN);
    p.map_area(area)?;
    let mut b = p.batch();
    let rseq = ptrace::rseq_config(p.pid)?;
    if rseq.rseq_abi_pointer != 0 {
        let args = [
            rseq.rseq_abi_pointer,
            rseq.rseq_abi_size as u64,
            sys::RSEQ_FLAG_UNREGISTER as u64,
            rseq.signature as u64,
        ];
        b.call("unregister the puppet's rseq", libc::SYS_rseq, &args);
    }
    for m in own.iter().filter(|m| !m.path.starts_with("[v")) {
        b.call(
            "munmap the puppet's own memory",
            libc::SYS_munmap,
            &[m.start, m.len()],
        );
    }
    p.run(b).map(drop)
}

/// The lowest free range of `len` bytes (plus a guard page each side) above
/// 4 GiB that overlaps none of `busy`.
fn find_gap(busy: &[(u64, u64)], len: u64) -> u64 {
    let mut v = busy.to_vec();
    v.sort();
    let mut at = 1u64 << 32;
    for (s, e) in v {
        if e + PAGE_SIZE <= at {
            continue;
        }
        if s >= at + len + 2 * PAGE_SIZE {
            break;
        }
        at = at.max(e + PAGE_SIZE);
    }
    at + PAGE_SIZE
}

fn special_name(k: &VmaKind) -> Option<&'static str> {
    match k {
        VmaKind::Vdso => Some("[vdso]"),
        VmaKind::Vvar => Some("[vvar]"),
        VmaKind::VvarVclock => Some("[vvar_vclock]"),
        _ => None,
    }
}

/// Moves the puppet's [vdso] and [vvar]s to where the image had them
/// (through free addresses first, so that no move lands on another).
fn place_specials(p: &mut Puppet, image_vmas: &[Vma]) -> Result<()> {
    let own: Vec<_> = proc::maps(p.pid)?
        .into_iter()
        .filter(|m| m.path.starts_with("[v") && m.path != "[vsyscall]")
        .collect();
    let mut busy: Vec<(u64, u64)> = own.iter().map(|m| (m.start, m.end)).collect();
    busy.extend(image_vmas.iter().map(|v| (v.start, v.end)));
    busy.push((p.area, p.area + CODE_LEN + SCRATCH_LEN));
    let (mut first, mut second) = (p.batch(), p.batch());
    let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
    for m in &own {
        let want = image_vmas
            .iter()
            .find(|v| special_name(&v.kind) == Some(m.path.as_str()));
        match want {
            Some(v) if v.len() != m.len() => {
                return Err(Error::Restore(format!(
                    "{} is {} bytes here but {} in the image: resume on the kernel that took the snapshot",
                    m.path,
                    m.len(),
                    v.len()
                )))
            }
            Some(v) => {
                let tmp = find_gap(&busy, m.len());
                busy.push((tmp, tmp + m.len()));
                first.call("mremap vdso/vvar aside", libc::SYS_mremap, &[m.start, m.len(), m.len(), flags, tmp]);
                second.call("mremap vdso/vvar in place", libc::SYS_mremap, &[tmp, m.len(), m.len(), flags, v.start]);
            }
            None => first.call("munmap a vdso the image lacks", libc::SYS_munmap, &[m.start, m.len()]),
        }
    }
    p.run(first)?;
    p.run(second).map(drop)
}

/// Maps every VMA of the image and fills in its stored pages: one batch
/// opens the files, one maps everything, then memory is copied in, then
/// one batch sets the final protections.
fn map_memory(
    p: &mut Puppet,
    vmas: &[Vma],
    (pages, ancestors): (&[u8], &[crate::image::Pages]),
    lazy: bool,
    installer: &mut crate::fds::Installer,
) -> Result<()> {
    let vmas: Vec<&Vma> = vmas
        .iter()
        .filter(|v| special_name(&v.kind).is_none() && v.kind != VmaKind::Vsyscall)
        .collect();
    let mut sources = Vec::new();
    for v in &vmas {
        sources.push(source_of(v, installer)?);
    }
    let mut opens = p.batch();
    for s in &sources {
        match s {
            Source::Open { path, flags } => {
                let a = opens.path(path)?;
                opens.call(
                    format!("open {path}"),
                    libc::SYS_openat,
                    &[libc::AT_FDCWD as u64, a, *flags as u64],
                );
            }
            Source::Memfd { label, .. } => {
                let a = opens.path(label)?;
                opens.call(
                    "memfd_create",
                    libc::SYS_memfd_create,
                    &[a, libc::MFD_CLOEXEC as u64],
                );
            }
            Source::Anon | Source::Shared { .. } => {}
        }
    }
    let fds = p.run(opens)?;
    let mut fd_iter = fds.iter();
    let mut maps = p.batch();
    let mut protects = p.batch();
    let filled =
        |v: &Vma| matches!(v.kind, VmaKind::Shmem { object, .. } if installer.is_filled(object));
    let has_data = |v: &Vma| !(v.pages.is_empty() && v.inherited.is_empty());
    let fill_now = |v: &Vma| has_data(v) && !(lazy && crate::pager::is_lazy(v) || filled(v));
    for (v, s) in vmas.iter().zip(&sources) {
        let fill = fill_now(v);
        let prot = v.prot() | if fill { libc::PROT_WRITE } else { 0 };
        let share = if v.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        let (flags, fd, offset) = match (s, &v.kind) {
            (Source::Anon, _) if v.shared => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, u64::MAX, 0),
            (Source::Anon, _) => {
                let grows = if v.growsdown { libc::MAP_GROWSDOWN } else { 0 };
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | grows, u64::MAX, 0)
            }
            (Source::Open { .. }, VmaKind::File { offset, .. }) => {
                (share, *fd_iter.next().expect("fd"), *offset)
            }
            (Source::Open { .. }, VmaKind::Shmem { offset, .. }) => {
                (libc::MAP_SHARED, *fd_iter.next().expect("fd"), *offset)
            }
            // Shared with other processes of the tree: the resumer's object,
            // which this puppet inherited (and must not close).
            (Source::Shared { fd }, VmaKind::Shmem { offset, .. }) => {
                (libc::MAP_SHARED, *fd as u64, *offset)
            }
            (Source::Memfd { size, offset, .. }, _) => {
                let fd = *fd_iter.next().expect("fd");
                maps.call("ftruncate memfd", libc::SYS_ftruncate, &[fd, *size]);
                (libc::MAP_SHARED, fd, *offset)
            }
            _ => unreachable!("sources follow kinds"),
        };
        let what = format!("mmap {:#x}-{:#x} ({:?})", v.start, v.end, v.kind);
        maps.call(
            what,
            libc::SYS_mmap,
            &[
                v.start,
                v.len(),
                prot as u64,
                (flags | libc::MAP_FIXED) as u64,
                fd,
                offset,
            ],
        );
        if fd != u64::MAX && !matches!(s, Source::Shared { .. }) {
            maps.call("close", libc::SYS_close, &[fd]);
        }
        if prot != v.prot() {
            protects.call(
                "mprotect",
                libc::SYS_mprotect,
                &[v.start, v.len(), v.prot() as u64],
            );
        }
        for g in &v.guards {
            protects.call(
                "madvise(MADV_GUARD_INSTALL)",
                libc::SYS_madvise,
                &[g[0], g[1] * PAGE_SIZE, sys::MADV_GUARD_INSTALL],
            );
        }
    }
    p.run(maps)?;
    for v in vmas.iter().filter(|v| fill_now(v)) {
        fill_vma(p.pid, v, pages)?;
        fill_inherited(p.pid, v, ancestors)?;
    }
    p.run(protects).map(drop)
}

/// Creates a userfaultfd inside the puppet (it must belong to the puppet's
/// address space), takes it, registers the lazy VMAs and starts the pager.
/// The puppet's own copy of the descriptor goes with its other fds.
fn arm_pager(
    p: &mut Puppet,
    process: &Process,
    launch: &PagerLauncher,
    job: PagerFor,
) -> Result<OwnedFd> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let fd = p.sys("userfaultfd", libc::SYS_userfaultfd, &[flags])?;
    let uffd = crate::uffd::Uffd::from_fd(crate::uffd::take_fd(p.pid, fd as i32)?);
    uffd.api(crate::pager::FEATURES)?;
    for v in process.vmas.iter().filter(|v| crate::pager::is_lazy(v)) {
        uffd.register(v.start, v.len(), crate::uffd::MODE_MISSING)?;
    }
    let (go_read, go_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe", e))?;
    // The pager must not share the pin (see `resume`).
    crate::ptrace::while_unpinned(|| launch(uffd.fd, go_read, job))?;
    Ok(go_write)
}

/// Where a VMA's contents come from at resume.
enum Source {
    Anon,
    /// A file opened by path (mapped files, existing tmpfs files).
    Open {
        path: String,
        flags: i32,
    },
    /// A new memfd (memfds, deleted files): its label, size and offset.
    Memfd {
        label: String,
        size: u64,
        offset: u64,
    },
    /// Memory several processes of the tree share: the resumer's memfd.
    Shared {
        fd: i32,
    },
}

/// True for a shared mapping of a tmpfs file that still exists (reopened
/// by path, not recreated).
pub fn reopens_tmpfs(name: &str) -> bool {
    name.starts_with('/') && !name.ends_with(" (deleted)") && Path::new(name).exists()
}

fn source_of(v: &Vma, installer: &mut crate::fds::Installer) -> Result<Source> {
    if let VmaKind::Shmem { object, offset, .. } = &v.kind {
        if installer.has_shm(*object) {
            let fd = installer.shm(*object, "", offset + v.len())?;
            return Ok(Source::Shared { fd });
        }
    }
    Ok(match &v.kind {
        VmaKind::File { path, .. } => {
            let mode = if v.shared && v.write {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            Source::Open {
                path: path.clone(),
                flags: mode | libc::O_CLOEXEC,
            }
        }
        VmaKind::Shmem { name, offset, .. } => {
            if reopens_tmpfs(name) {
                return Ok(Source::Open {
                    path: name.clone(),
                    flags: libc::O_RDWR | libc::O_CLOEXEC,
                });
            }
            let anon = name.starts_with("/dev/zero")
                || name.starts_with("/SYSV")
                || !name.starts_with('/');
            if anon {
                return Ok(Source::Anon);
            }
            let label = name
                .trim_start_matches("/memfd:")
                .trim_end_matches(" (deleted)");
            Source::Memfd {
                label: label.chars().take(200).collect(),
                size: offset + v.len(),
                offset: *offset,
            }
        }
        _ => Source::Anon,
    })
}

/// Writes the stored pages of a VMA, one process_vm_writev per stretch that
/// is contiguous in pages.img.
/// Writes the pages an incremental image takes from its ancestors.
fn fill_inherited(pid: i32, v: &Vma, ancestors: &[crate::image::Pages]) -> Result<()> {
    for r in &v.inherited {
        let len = r[1] * PAGE_SIZE;
        let data = ancestors
            .get((r[3] as usize).wrapping_sub(1))
            .and_then(|a| a.get(r[2] as usize..(r[2] + len) as usize))
            .ok_or_else(|| {
                Error::Restore(format!(
                    "inherited pages at {:#x} point outside parent image {}",
                    r[0], r[3]
                ))
            })?;
        mem::vm_write(pid, &[(r[0], len as usize)], data)?;
    }
    Ok(())
}

fn fill_vma(pid: i32, v: &Vma, pages: &[u8]) -> Result<()> {
    let mut i = 0;
    while i < v.pages.len() {
        let start_off = v.pages[i][2];
        let mut end_off = start_off;
        let mut ranges = Vec::new();
        while i < v.pages.len() && v.pages[i][2] == end_off {
            let len = v.pages[i][1] * PAGE_SIZE;
            ranges.push((v.pages[i][0], len as usize));
            end_off += len;
            i += 1;
        }
        mem::vm_write(pid, &ranges, &pages[start_off as usize..end_off as usize])?;
    }
    Ok(())
}

fn process_attributes(p: &mut Puppet, process: &Process) -> Result<()> {
    for &(res, cur, max) in &process.rlimits {
        let new = libc::rlimit64 {
            rlim_cur: cur,
            rlim_max: max,
        };
        // SAFETY: new is a valid rlimit64; no old value is read.
        let r = unsafe { libc::prlimit64(p.pid, res as _, &new, std::ptr::null_mut()) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!("rlimit {res} ({cur}/{max}) not restored: {e}");
        }
    }
    let cwd = if Path::new(&process.cwd).is_dir() {
        process.cwd.as_str()
    } else {
        "/"
    };
    let mut b = p.batch();
    let addr = b.path(cwd)?;
    b.call(format!("chdir {cwd}"), libc::SYS_chdir, &[addr]);
    b.call("umask", libc::SYS_umask, &[process.umask as u64]);
    b.call("personality", libc::SYS_personality, &[process.personality]);
    // The puppet came with umlctl's handlers: reset those the image lacks.
    let st = proc::status(p.pid)?;
    let custom = proc::status_hex(&st, "SigCgt") | proc::status_hex(&st, "SigIgn");
    for sig in 1..=64i32 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let act = process
            .sigactions
            .iter()
            .find(|(s, _)| *s == sig)
            .map(|(_, a)| *a);
        if act.is_none() && custom & (1u64 << (sig - 1)) == 0 {
            continue;
        }
        let addr = b.data(sys::as_bytes(&act.unwrap_or_default()))?;
        b.call(
            format!("rt_sigaction {sig}"),
            libc::SYS_rt_sigaction,
            &[sig as u64, addr, 0, 8],
        );
    }
    p.run(b).map(drop)
}

/// Sets brk, arg/env, auxv and the exe link in one PR_SET_MM_MAP call (the
/// one form that works without CAP_SYS_RESOURCE).
fn set_mm(p: &mut Puppet, process: &Process) -> Result<()> {
    let mm = &process.mm;
    let exe_fd = if process.exe.ends_with(" (deleted)") || !Path::new(&process.exe).exists() {
        u32::MAX
    } else {
        p.open(&process.exe, libc::O_RDONLY | libc::O_CLOEXEC, 0)? as u32
    };
    let auxv: Vec<u8> = mm.auxv.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let auxv_addr = p.put(0x2000, &auxv)?;
    let map = sys::PrctlMmMap {
        start_code: mm.start_code,
        end_code: mm.end_code,
        start_data: mm.start_data,
        end_data: mm.end_data,
        start_brk: mm.start_brk,
        brk: mm.brk,
        start_stack: mm.start_stack,
        arg_start: mm.arg_start,
        arg_end: mm.arg_end,
        env_start: mm.env_start,
        env_end: mm.env_end,
        auxv: auxv_addr,
        auxv_size: auxv.len() as u32,
        exe_fd,
    };
    let addr = p.put(0x1000, sys::as_bytes(&map))?;
    let r = p.sys(
        "prctl(PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[
            sys::PR_SET_MM as u64,
            sys::PR_SET_MM_MAP,
            addr,
            std::mem::size_of::<sys::PrctlMmMap>() as u64,
            0,
        ],
    );
    if exe_fd != u32::MAX {
        p.close(exe_fd as i32)?;
    }
    r.map(drop)
}

/// Creates the image's other threads with injected clone3 calls; returns
/// a handle on each, in image order.
fn create_threads(p: &mut Puppet, threads: &[Thread], same_pid: bool) -> Result<Vec<Remote>> {
    let mut out = Vec::new();
    for t in threads.iter().skip(1) {
        let tid_addr = p.put(0x3100, &t.tid.to_ne_bytes())?;
        let flags = libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM;
        let args = sys::CloneArgs {
            flags: flags as u64,
            set_tid: if same_pid { tid_addr } else { 0 },
            set_tid_size: same_pid as u64,
            ..Default::default()
        };
        let addr = p.put(0x3000, sys::as_bytes(&args))?;
        let r = p.main.call(
            libc::SYS_clone3,
            &[addr, std::mem::size_of::<sys::CloneArgs>() as u64],
        )?;
        if r == -(libc::EEXIST as i64) {
            return Err(Error::PidInUse(t.tid));
        }
        if r < 0 {
            return Err(Error::sys(
                "clone3 a thread",
                nix::errno::Errno::from_raw(-r as i32),
            ));
        }
        let tid = r as i32;
        if !ptrace::wait_frozen(tid)? {
            return Err(Error::Restore(format!("new thread {tid} died")));
        }
        out.push(Remote::new(tid, p.area, ptrace::getregs(tid)?));
    }
    Ok(out)
}

/// One thread's own kernel state, run as that thread: name, rseq,
/// clear_child_tid, robust list, alternate signal stack; then its
/// credentials (the kernel keeps them per thread): bounding set, groups,
/// gids, uids, capabilities, last no_new_privs; then its pending signals.
fn thread_batch(p: &Puppet, process: &Process, t: &Thread, tid: i32) -> Result<Batch> {
    let main = tid == p.pid;
    let mut b = p.batch();
    let mut name = t.comm.as_bytes().to_vec();
    name.truncate(15);
    name.push(0);
    let addr = b.data(&name)?;
    b.call(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, addr],
    );
    if let Some(q) = t.rseq {
        b.call(
            "rseq register",
            libc::SYS_rseq,
            &[q.addr, q.len as u64, 0, q.sig as u64],
        );
    }
    b.call(
        "set_tid_address",
        libc::SYS_set_tid_address,
        &[t.clear_child_tid],
    );
    let len = if t.robust_list_len == 0 {
        24
    } else {
        t.robust_list_len
    };
    b.call(
        "set_robust_list",
        libc::SYS_set_robust_list,
        &[t.robust_list, len],
    );
    let (sp, flags, size) = t.altstack;
    let stack: [u64; 3] = if flags & libc::SS_DISABLE != 0 {
        [0, libc::SS_DISABLE as u64, 0]
    } else {
        [sp, (flags & !libc::SS_ONSTACK) as u64, size]
    };
    let addr = b.data(
        &stack
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect::<Vec<u8>>(),
    )?;
    b.call("sigaltstack", libc::SYS_sigaltstack, &[addr, 0]);
    creds(&mut b, process, main)?;
    for info in &t.pending {
        let signo = i32::from_ne_bytes(info[..4].try_into().expect("siginfo"));
        let addr = b.data(info)?;
        let args = [p.pid as u64, tid as u64, signo as u64, addr];
        b.call("rt_tgsigqueueinfo", libc::SYS_rt_tgsigqueueinfo, &args);
    }
    Ok(b)
}

/// Drops the calling thread to the image's credentials.
fn creds(b: &mut Batch, process: &Process, main: bool) -> Result<()> {
    let c = &process.creds;
    for cap in 0..=last_cap() {
        if c.cap_bounding & (1 << cap) == 0 {
            b.call(
                "prctl(PR_CAPBSET_DROP)",
                libc::SYS_prctl,
                &[libc::PR_CAPBSET_DROP as u64, cap],
            );
        }
    }
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    let addr = b.data(&groups)?;
    b.call(
        "setgroups",
        libc::SYS_setgroups,
        &[c.groups.len() as u64, addr],
    );
    b.call(
        "setresgid",
        libc::SYS_setresgid,
        &[c.gids[0] as u64, c.gids[1] as u64, c.gids[2] as u64],
    );
    let keep = c.cap_permitted != 0;
    if keep {
        b.call(
            "prctl(PR_SET_KEEPCAPS)",
            libc::SYS_prctl,
            &[libc::PR_SET_KEEPCAPS as u64, 1],
        );
    }
    b.call(
        "setresuid",
        libc::SYS_setresuid,
        &[c.uids[0] as u64, c.uids[1] as u64, c.uids[2] as u64],
    );
    if keep {
        let hdr = sys::CapUserHeader {
            version: sys::LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let (lo, hi) = (|v: u64| v as u32, |v: u64| (v >> 32) as u32);
        let data = [
            sys::CapUserData {
                effective: lo(c.cap_effective),
                permitted: lo(c.cap_permitted),
                inheritable: lo(c.cap_inheritable),
            },
            sys::CapUserData {
                effective: hi(c.cap_effective),
                permitted: hi(c.cap_permitted),
                inheritable: hi(c.cap_inheritable),
            },
        ];
        let h = b.data(sys::as_bytes(&hdr))?;
        let d = b.data(sys::as_bytes(&data))?;
        b.call("capset", libc::SYS_capset, &[h, d]);
        for cap in (0..64u64).filter(|cap| c.cap_ambient & (1 << cap) != 0) {
            let args = [
                libc::PR_CAP_AMBIENT as u64,
                libc::PR_CAP_AMBIENT_RAISE as u64,
                cap,
            ];
            b.call("prctl(PR_CAP_AMBIENT_RAISE)", libc::SYS_prctl, &args);
        }
        b.call(
            "prctl(PR_SET_KEEPCAPS)",
            libc::SYS_prctl,
            &[libc::PR_SET_KEEPCAPS as u64, 0],
        );
    }
    if main {
        b.call(
            "prctl(PR_SET_DUMPABLE)",
            libc::SYS_prctl,
            &[libc::PR_SET_DUMPABLE as u64, c.dumpable as u64],
        );
    }
    if c.no_new_privs {
        b.call(
            "prctl(PR_SET_NO_NEW_PRIVS)",
            libc::SYS_prctl,
            &[libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0],
        );
    }
    Ok(())
}

/// glibc caches each thread's tid at its clear_child_tid address; a thread
/// with a new tid gets it written there (only where the old one is found).
fn patch_tid(mem: &crate::mem::ProcMem, t: &Thread, new_tid: i32) -> Result<()> {
    if t.clear_child_tid != 0 && new_tid != t.tid {
        let mut b = [0u8; 4];
        if mem.read(t.clear_child_tid, &mut b).is_ok() && i32::from_ne_bytes(b) == t.tid {
            mem.write(t.clear_child_tid, &new_tid.to_ne_bytes())?;
        }
    }
    Ok(())
}

fn last_cap() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}
