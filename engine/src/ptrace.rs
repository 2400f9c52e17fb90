//! Thin, safe wrappers over ptrace(2) for the requests the engine uses, and
//! freezing / thawing a whole thread group.
//!
//! nix covers the common requests; register sets beyond NT_PRSTATUS, signal
//! masks and the rseq configuration go through libc::ptrace here.

use crate::error::{Error, Result};
use crate::sys;
use nix::errno::Errno;
use nix::sys::ptrace::{self, Options};
use nix::unistd::Pid;

pub type Regs = libc::user_regs_struct;

/// Largest XSAVE area we expect (the host's is 11008 bytes with AMX).
const XSTATE_MAX: usize = 64 * 1024;

pub fn seize(tid: i32, opts: Options) -> Result<()> {
    ptrace::seize(Pid::from_raw(tid), opts).map_err(|e| match e {
        Errno::ESRCH => Error::NoSuchProcess(tid),
        Errno::EPERM => Error::NotPermitted(tid),
        e => Error::sys(format!("PTRACE_SEIZE {tid}"), e),
    })
}

pub fn interrupt(tid: i32) -> Result<()> {
    ptrace::interrupt(Pid::from_raw(tid))
        .map_err(|e| Error::sys(format!("PTRACE_INTERRUPT {tid}"), e))
}

pub fn detach(tid: i32, sig: i32) -> Result<()> {
    let sig = if sig == 0 {
        None
    } else {
        nix::sys::signal::Signal::try_from(sig).ok()
    };
    ptrace::detach(Pid::from_raw(tid), sig)
        .map_err(|e| Error::sys(format!("PTRACE_DETACH {tid}"), e))
}

pub fn getregs(tid: i32) -> Result<Regs> {
    ptrace::getregs(Pid::from_raw(tid)).map_err(|e| Error::sys(format!("PTRACE_GETREGS {tid}"), e))
}

pub fn setregs(tid: i32, regs: &Regs) -> Result<()> {
    ptrace::setregs(Pid::from_raw(tid), *regs)
        .map_err(|e| Error::sys(format!("PTRACE_SETREGS {tid}"), e))
}

/// Resume to the next syscall entry or exit.
pub fn syscall(tid: i32, sig: i32) -> Result<()> {
    // SAFETY: PTRACE_SYSCALL takes no pointers.
    let r = unsafe { libc::ptrace(libc::PTRACE_SYSCALL, tid, 0, sig as libc::c_long) };
    Errno::result(r)
        .map(drop)
        .map_err(|e| Error::sys(format!("PTRACE_SYSCALL {tid}"), e))
}

pub fn cont(tid: i32, sig: i32) -> Result<()> {
    // SAFETY: PTRACE_CONT takes no pointers.
    let r = unsafe { libc::ptrace(libc::PTRACE_CONT, tid, 0, sig as libc::c_long) };
    Errno::result(r)
        .map(drop)
        .map_err(|e| Error::sys(format!("PTRACE_CONT {tid}"), e))
}

/// The full XSAVE area (x87, SSE, AVX, AVX-512, AMX...) in the standard format.
pub fn get_xstate(tid: i32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: iov points at a live buffer of iov_len bytes.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            sys::NT_X86_XSTATE as usize,
            &mut iov,
        )
    };
    Errno::result(r)
        .map_err(|e| Error::sys(format!("PTRACE_GETREGSET(NT_X86_XSTATE) {tid}"), e))?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// Byte offset of XSTATE_BV in the XSAVE header.
const XSTATE_BV_OFFSET: usize = 512;
const XFEATURE_XTILEDATA: u64 = 1 << 18;

pub fn set_xstate(tid: i32, xstate: &[u8]) -> Result<()> {
    let mut buf = xstate.to_vec();
    clear_unused_amx(&mut buf);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: iov points at a live buffer of iov_len bytes.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid,
            sys::NT_X86_XSTATE as usize,
            &mut iov,
        )
    };
    Errno::result(r).map(drop).map_err(|e| {
        Error::sys(
            format!(
                "PTRACE_SETREGSET(NT_X86_XSTATE) {tid} ({} bytes)",
                buf.len()
            ),
            e,
        )
    })
}

/// The kernel refuses tile data for a thread that never used AMX; when the
/// saved tile data is all zeros (its init state) claim the init state instead.
fn clear_unused_amx(buf: &mut [u8]) {
    if buf.len() < XSTATE_BV_OFFSET + 8 {
        return;
    }
    let bv = u64::from_le_bytes(
        buf[XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8]
            .try_into()
            .expect("8"),
    );
    if bv & XFEATURE_XTILEDATA == 0 {
        return;
    }
    // The tile data component is the last 8 KiB of the standard layout.
    let start = buf.len().saturating_sub(8192);
    if buf[start..].iter().all(|&b| b == 0) {
        let bv = bv & !XFEATURE_XTILEDATA;
        buf[XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8].copy_from_slice(&bv.to_le_bytes());
    }
}

pub fn get_sigmask(tid: i32) -> Result<u64> {
    let mut mask = 0u64;
    // SAFETY: data points at 8 writable bytes, as the request's size says.
    let r = unsafe { libc::ptrace(libc::PTRACE_GETSIGMASK, tid, 8usize, &mut mask) };
    Errno::result(r).map_err(|e| Error::sys(format!("PTRACE_GETSIGMASK {tid}"), e))?;
    Ok(mask)
}

pub fn set_sigmask(tid: i32, mask: u64) -> Result<()> {
    // SAFETY: data points at 8 readable bytes.
    let r = unsafe { libc::ptrace(libc::PTRACE_SETSIGMASK, tid, 8usize, &mask) };
    Errno::result(r)
        .map(drop)
        .map_err(|e| Error::sys(format!("PTRACE_SETSIGMASK {tid}"), e))
}

pub fn rseq_config(tid: i32) -> Result<sys::PtraceRseqConfiguration> {
    let mut c = sys::PtraceRseqConfiguration::default();
    // SAFETY: data points at a struct of the size passed in addr.
    let r = unsafe {
        libc::ptrace(
            sys::PTRACE_GET_RSEQ_CONFIGURATION,
            tid,
            std::mem::size_of::<sys::PtraceRseqConfiguration>(),
            &mut c,
        )
    };
    Errno::result(r).map_err(|e| Error::sys(format!("PTRACE_GET_RSEQ_CONFIGURATION {tid}"), e))?;
    Ok(c)
}

/// Pending signals of a thread (`shared` = the process-wide queue), as raw
/// 128-byte siginfo records.
pub fn pending_signals(tid: i32, shared: bool) -> Result<Vec<[u8; 128]>> {
    #[repr(C)]
    struct PeekArgs {
        off: u64,
        flags: u32,
        nr: i32,
    }
    let mut out = Vec::new();
    loop {
        let mut buf = [[0u8; 128]; 16];
        let args = PeekArgs {
            off: out.len() as u64,
            flags: if shared { 1 } else { 0 },
            nr: 16,
        };
        // SAFETY: args is a valid ptrace_peeksiginfo_args; buf holds nr records.
        let r = unsafe { libc::ptrace(libc::PTRACE_PEEKSIGINFO, tid, &args, buf.as_mut_ptr()) };
        let n = Errno::result(r).map_err(|e| Error::sys(format!("PTRACE_PEEKSIGINFO {tid}"), e))?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
}

/// What waitpid reported for a traced thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A PTRACE_EVENT_STOP (interrupt or group stop) or another event stop.
    Event(i32),
    /// A syscall entry or exit (with PTRACE_O_TRACESYSGOOD).
    Syscall,
    /// About to deliver this signal.
    Signal(i32),
    /// The thread is gone.
    Exited,
}

pub fn wait(tid: i32) -> Result<Stop> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out pointer.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        if r == -1 {
            let e = Errno::last();
            if e == Errno::EINTR {
                continue;
            }
            if e == Errno::ECHILD {
                return Ok(Stop::Exited);
            }
            return Err(Error::sys(format!("waitpid {tid}"), e));
        }
        break;
    }
    if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
        return Ok(Stop::Exited);
    }
    let sig = libc::WSTOPSIG(status);
    let event = status >> 16;
    Ok(if sig == (libc::SIGTRAP | 0x80) {
        Stop::Syscall
    } else if event != 0 {
        Stop::Event(event)
    } else {
        Stop::Signal(sig)
    })
}

/// Waits until `tid` is in a ptrace stop where registers may be changed,
/// passing through signals that arrive meanwhile (they are delivered first,
/// as they would have been without us). Returns false if the thread exited.
pub fn wait_frozen(tid: i32) -> Result<bool> {
    loop {
        match wait(tid)? {
            Stop::Exited => return Ok(false),
            Stop::Event(_) | Stop::Syscall => return Ok(true),
            Stop::Signal(sig) => cont(tid, sig)?,
        }
    }
}

/// A thread group held in ptrace stops. Dropping it detaches every thread
/// (restoring registers that injection changed), so an error anywhere in a
/// dump releases the target as it was.
pub struct Frozen {
    pub pid: i32,
    pub tids: Vec<i32>,
    /// Registers of each thread at the freeze, in `tids` order.
    pub regs: Vec<Regs>,
    /// Threads whose registers were changed and must be put back.
    pub touched: Vec<bool>,
    /// Signals intercepted during injection, to deliver at detach.
    pub intercepted: Vec<i32>,
    released: bool,
}

impl Frozen {
    /// Seizes and stops every thread of `pid`, looping until no new thread appears.
    pub fn freeze(pid: i32, opts: Options) -> Result<Frozen> {
        let mut f = Frozen {
            pid,
            tids: vec![],
            regs: vec![],
            touched: vec![],
            intercepted: vec![],
            released: false,
        };
        loop {
            let now = crate::proc::threads(pid)?;
            let new: Vec<i32> = now
                .iter()
                .copied()
                .filter(|t| !f.tids.contains(t))
                .collect();
            if new.is_empty() {
                break;
            }
            for tid in new {
                match seize(tid, opts) {
                    Ok(()) => {}
                    // Auto-attached through TRACECLONE already: just wait for it.
                    Err(Error::Sys {
                        errno: Errno::EPERM,
                        ..
                    }) if !f.tids.is_empty() => {}
                    Err(Error::NoSuchProcess(_)) if tid != pid => continue,
                    Err(e) => return Err(e),
                }
                let _ = interrupt(tid);
                if !wait_frozen(tid)? {
                    if tid == pid {
                        return Err(Error::NoSuchProcess(pid));
                    }
                    continue;
                }
                f.tids.push(tid);
            }
        }
        // Main thread first.
        f.tids.sort_by_key(|&t| (t != pid, t));
        for &tid in &f.tids {
            f.regs.push(getregs(tid)?);
            f.touched.push(false);
            f.intercepted.push(0);
        }
        Ok(f)
    }

    pub fn index(&self, tid: i32) -> usize {
        self.tids
            .iter()
            .position(|&t| t == tid)
            .expect("frozen thread")
    }

    /// Lets every thread run again from where it was frozen.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        self.detach_all()
    }

    /// Kills the process while it is still frozen (no further instruction runs).
    pub fn kill(mut self) -> Result<()> {
        self.released = true;
        nix::sys::signal::kill(Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGKILL)
            .map_err(|e| Error::sys(format!("kill {}", self.pid), e))?;
        for &tid in &self.tids {
            let _ = detach(tid, 0);
        }
        Ok(())
    }

    fn detach_all(&mut self) -> Result<()> {
        let mut first_err = None;
        for i in 0..self.tids.len() {
            let tid = self.tids[i];
            if self.touched[i] {
                let regs = restartable(self.regs[i]);
                if let Err(e) = setregs(tid, &regs) {
                    first_err.get_or_insert(e);
                }
            }
            if let Err(e) = detach(tid, self.intercepted[i]) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.detach_all() {
                tracing::warn!("releasing pid {}: {e}", self.pid);
            }
        }
    }
}

/// Registers to resume a thread with after its ptrace stop was used for
/// something else (injection, or a new process): a thread stopped inside an
/// interrupted syscall carries a restart code in rax, which the kernel only
/// acts on when it delivers a signal; rewind it to re-issue the syscall.
pub fn restartable(mut regs: Regs) -> Regs {
    let rax = -(regs.rax as i64);
    if (regs.orig_rax as i64) >= 0
        && matches!(
            rax,
            sys::ERESTARTSYS
                | sys::ERESTARTNOINTR
                | sys::ERESTARTNOHAND
                | sys::ERESTART_RESTARTBLOCK
        )
    {
        regs.rax = regs.orig_rax;
        regs.rip -= 2;
    }
    regs.orig_rax = u64::MAX;
    regs
}

/// Size of this host's XSAVE area as ptrace reports it (CPUID leaf 0xD:
/// the size for every feature enabled in XCR0, AMX included).
pub fn get_xstate_size() -> usize {
    std::arch::x86_64::__cpuid_count(0xd, 0).ebx as usize
}

/// This thread runs on the CPU where a process last ran, until dropped
/// (then on the CPUs it had before). A ptrace round trip wakes the tracee
/// and waits for it: on one CPU that is a context switch, across two an
/// inter-processor wake-up, dearer in a VM (a lazy snapshot of 128 MiB
/// stopped its target 1.8 ms instead of 1.1 here). Only our own affinity
/// changes; a target's is never touched, and processes we make while
/// pinned get the CPUs we had before (`unpin_threads`, `while_unpinned`).
pub struct Pinned {
    before: Option<nix::sched::CpuSet>,
}

impl Pinned {
    /// Best effort: without the information or the permission, nothing changes.
    pub fn near(pid: i32) -> Pinned {
        let cpu = crate::proc::stat_fields(pid).map(|f| crate::proc::stat_field(&f, 39) as usize);
        cpu.map_or(Pinned { before: None }, Pinned::on)
    }

    /// Pins us to the CPU we run on now (a resume: the processes it forks
    /// inherit the pin, and must get `unpin_threads` before they run).
    pub fn here() -> Pinned {
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        match usize::try_from(cpu) {
            Ok(cpu) => Pinned::on(cpu),
            Err(_) => Pinned { before: None },
        }
    }

    fn on(cpu: usize) -> Pinned {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        let me = nix::unistd::Pid::from_raw(0);
        let Ok(before) = sched_getaffinity(me) else {
            return Pinned { before: None };
        };
        let mut one = CpuSet::new();
        if !before.is_set(cpu).unwrap_or(false) || one.set(cpu).is_err() {
            return Pinned { before: None };
        }
        let pinned = sched_setaffinity(me, &one).is_ok();
        if pinned {
            *UNPINNED.lock().unwrap_or_else(|e| e.into_inner()) = Some(before);
        }
        Pinned {
            before: pinned.then_some(before),
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(before) = &self.before {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), before);
            *UNPINNED.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

/// Lets the calling thread run on the CPUs the process had before a
/// `Pinned` narrowed them: a helper thread spawned by a pinned one inherits
/// its single CPU, and helpers are there to use the others.
pub fn unpin_thread() {
    let before = UNPINNED.lock().ok().and_then(|b| *b);
    if let Some(set) = before {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Gives `tids` (threads made while a `Pinned` was live, which inherited
/// its single CPU) the CPUs the process had before.
pub fn unpin_threads(tids: impl IntoIterator<Item = i32>) -> Result<()> {
    let Some(before) = UNPINNED.lock().ok().and_then(|b| *b) else {
        return Ok(());
    };
    for tid in tids {
        nix::sched::sched_setaffinity(Pid::from_raw(tid), &before)
            .map_err(|e| Error::sys(format!("set the CPU affinity of thread {tid}"), e))?;
    }
    Ok(())
}

/// Runs `f` on the CPUs the process had before a live `Pinned` (to start
/// a process or thread that must not inherit the pin), then pins again.
pub fn while_unpinned<T>(f: impl FnOnce() -> T) -> T {
    let me = Pid::from_raw(0);
    let (before, now) = (
        UNPINNED.lock().ok().and_then(|b| *b),
        nix::sched::sched_getaffinity(me),
    );
    if let Some(before) = &before {
        let _ = nix::sched::sched_setaffinity(me, before);
    }
    let r = f();
    if let (Some(_), Ok(now)) = (before, now) {
        let _ = nix::sched::sched_setaffinity(me, &now);
    }
    r
}

/// The affinity a live `Pinned` replaced (for `unpin_thread`).
static UNPINNED: std::sync::Mutex<Option<nix::sched::CpuSet>> = std::sync::Mutex::new(None);
