//! Snapshot ("dump") of a live process, stop-and-copy.
//!
//! Flow (DESIGN.md, "how a snapshot flows"): check the target, freeze every
//! thread, collect what /proc and ptrace tell, inject the few syscalls only
//! the target can answer, copy its memory while it is frozen, release (or
//! kill) it, publish the image. Any error or cancellation on the way drops
//! the `Frozen` guard (the target runs on untouched) and the `ImageWriter`
//! (no image directory remains).

use crate::error::{Error, IoContext, Result};
use crate::files;
use crate::image::{self, Creds, ImageWriter, Manifest, MmFields, Process, Rseq, Thread};
use crate::inject::{self, Remote};
use crate::mem::ProcMem;
use crate::memory;
use crate::proc::{self, MapsEntry};
use crate::ptrace::{self, Frozen};
use crate::sys;
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
}

/// Snapshots process `pid` into the new directory `out`.
pub fn dump(pid: i32, out: &Path, opts: &DumpOptions) -> Result<DumpReport> {
    let t0 = Instant::now();
    check_target(pid)?;
    let mut writer = ImageWriter::create(out)?;
    let mut frozen = crate::tree::freeze(
        pid,
        opts.tree,
        Options::PTRACE_O_TRACESYSGOOD | Options::PTRACE_O_TRACECLONE,
    )?;
    let t_frozen = Instant::now();
    let cancelled = || opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    tracing::debug!("froze {} processes in {:?}", frozen.len(), t_frozen - t0);
    // Every fd first: an unsupported one is refused before any memory is copied.
    let pids: Vec<i32> = frozen.iter().map(|f| f.pid).collect();
    let mut objects = crate::fds::Objects::new(&pids, opts.tcp_established_close)?;
    let mut fds = Vec::new();
    for &p in &pids {
        fds.push(files::collect(p, &mut writer, &mut objects)?);
    }
    objects.finish()?;
    let mut processes = Vec::new();
    for (f, fds) in frozen.iter_mut().zip(fds) {
        processes.push(collect(f, fds, &mut writer, opts, &cancelled)?);
    }
    let memory_bytes = processes
        .iter()
        .flat_map(|p| &p.vmas)
        .map(|v| v.stored_bytes())
        .sum();
    let manifest = Manifest {
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
        pages: writer.pages_info(),
        processes,
        objects: objects.list,
        pipes: objects.pipes,
    };
    let threads = frozen.iter().map(|f| f.tids.len()).sum();
    let nprocs = frozen.len();
    if cancelled() {
        return Err(Error::Interrupted);
    }
    let (frozen_for, dir) = if opts.kill {
        // Publish while frozen, then kill: no instruction runs after the instant saved.
        let dir = writer.finish(&manifest)?;
        let d = t_frozen.elapsed();
        for f in frozen {
            f.kill()?;
        }
        (d, dir)
    } else {
        for f in frozen.into_iter().rev() {
            f.release()?;
        }
        let d = t_frozen.elapsed();
        if cancelled() {
            return Err(Error::Interrupted);
        }
        (d, writer.finish(&manifest)?)
    };
    Ok(DumpReport {
        dir,
        pid,
        processes: nprocs,
        threads,
        memory_bytes,
        image_bytes: manifest.pages.len,
        frozen: frozen_for,
        total: t0.elapsed(),
    })
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
) -> Result<Process> {
    let pid = frozen.pid;
    let maps = proc::maps(pid)?;
    let (ppid, pgid, sid) = crate::tree::ids(pid)?;
    let st = proc::status(pid)?;
    let fields = proc::stat_fields(pid)?;
    let mem = ProcMem::open(pid)?;
    let t = Instant::now();
    let injected = inject_queries(frozen, &mem, &maps, &st)?;
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
    let vmas = memory::dump_vmas(pid, &maps, writer, opts.progress, cancelled)?;
    tracing::debug!("memory saved in {:?}", t.elapsed());
    Ok(Process {
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
    })
}

/// What only the target itself can tell.
struct Injected {
    sigactions: Vec<(i32, sys::KernelSigaction)>,
    tid_addresses: Vec<u64>,
    altstacks: Vec<(u64, i32, u64)>,
    brk: u64,
    dumpable: bool,
    timers: Vec<crate::image::PosixTimer>,
    itimers: Vec<(i32, u64, u64)>,
}

fn inject_queries(
    frozen: &mut Frozen,
    mem: &ProcMem,
    maps: &[MapsEntry],
    st: &std::collections::BTreeMap<String, String>,
) -> Result<Injected> {
    let main_regs = frozen.regs[0];
    let ip = inject::find_syscall_ip(mem, &main_regs, maps)?;
    frozen.touched[0] = true;
    let mut main = Remote::new(frozen.tids[0], ip, main_regs);
    let scratch = main.check(
        "mmap scratch page",
        libc::SYS_mmap,
        &[
            0,
            4096,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
    let result = (|| {
        let caught = proc::status_hex(st, "SigCgt");
        let ignored = proc::status_hex(st, "SigIgn");
        let mut sigactions = Vec::new();
        for sig in 1..=64i32 {
            let bit = 1u64 << (sig - 1);
            if caught & bit != 0 {
                main.check(
                    "rt_sigaction",
                    libc::SYS_rt_sigaction,
                    &[sig as u64, 0, scratch, 8],
                )?;
                let mut b = [0u8; 32];
                mem.read(scratch, &mut b)?;
                let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8"));
                sigactions.push((
                    sig,
                    sys::KernelSigaction {
                        handler: w(0),
                        flags: w(1),
                        restorer: w(2),
                        mask: w(3),
                    },
                ));
            } else if ignored & bit != 0 {
                sigactions.push((
                    sig,
                    sys::KernelSigaction {
                        handler: 1,
                        ..Default::default()
                    },
                ));
            }
        }
        let brk = main.check("brk(0)", libc::SYS_brk, &[0])?;
        let dumpable = main.check(
            "prctl(PR_GET_DUMPABLE)",
            libc::SYS_prctl,
            &[libc::PR_GET_DUMPABLE as u64],
        )? == 1;
        let (timers, itimers) = crate::timers::query(&mut main, mem, scratch + 128, frozen.pid)?;
        let mut tid_addresses = Vec::new();
        let mut altstacks = Vec::new();
        for i in 0..frozen.tids.len() {
            let mut r = if i == 0 {
                None
            } else {
                frozen.touched[i] = true;
                Some(Remote::new(frozen.tids[i], ip, frozen.regs[i]))
            };
            let remote = r.as_mut().unwrap_or(&mut main);
            remote.check(
                "prctl(PR_GET_TID_ADDRESS)",
                libc::SYS_prctl,
                &[sys::PR_GET_TID_ADDRESS as u64, scratch],
            )?;
            tid_addresses.push(mem.read_u64(scratch)?);
            remote.check("sigaltstack", libc::SYS_sigaltstack, &[0, scratch + 64])?;
            let ss_flags = mem.read_u64(scratch + 72)? as i32;
            altstacks.push((
                mem.read_u64(scratch + 64)?,
                ss_flags,
                mem.read_u64(scratch + 80)?,
            ));
            if let Some(r) = r {
                frozen.intercepted[i] = r.intercepted;
            }
        }
        Ok(Injected {
            sigactions,
            tid_addresses,
            altstacks,
            brk,
            dumpable,
            timers,
            itimers,
        })
    })();
    main.check("munmap scratch page", libc::SYS_munmap, &[scratch, 4096])?;
    frozen.intercepted[0] = main.intercepted;
    result
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
