//! Remote syscall injection: make a stopped thread execute one syscall of
//! our choosing, then put it back.
//!
//! The thread's rip is pointed at an existing `syscall` instruction (bytes
//! 0f 05) in one of its executable mappings, the arguments go into registers,
//! and PTRACE_SYSCALL runs it from entry to exit. This is the one mechanism
//! the engine uses to make a process do anything (read its signal handlers,
//! map memory into a puppet, open files...).

use crate::error::{Error, Result};
use crate::mem::ProcMem;
use crate::proc::MapsEntry;
use crate::ptrace::{self, Regs, Stop};

/// A thread held for injection.
pub struct Remote {
    pub tid: i32,
    /// Address of a `syscall` instruction in the thread's address space.
    pub ip: u64,
    /// Registers the injected calls start from (the thread's own, with orig_rax cleared).
    base: Regs,
    /// A signal that arrived during an injection, to be delivered later.
    pub intercepted: i32,
    /// The tid reported by a PTRACE_EVENT_CLONE (or _FORK) during the last call.
    pub last_clone: Option<i32>,
}

impl Remote {
    pub fn new(tid: i32, ip: u64, base: Regs) -> Remote {
        Remote {
            tid,
            ip,
            base,
            intercepted: 0,
            last_clone: None,
        }
    }

    /// Runs syscall `nr` with `args`; returns the raw result (-errno on failure).
    pub fn call(&mut self, nr: i64, args: &[u64]) -> Result<i64> {
        let mut regs = self.base;
        regs.rip = self.ip;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        let slots = [
            &mut regs.rdi,
            &mut regs.rsi,
            &mut regs.rdx,
            &mut regs.r10,
            &mut regs.r8,
            &mut regs.r9,
        ];
        for (slot, v) in slots.into_iter().zip(args.iter()) {
            *slot = *v;
        }
        ptrace::setregs(self.tid, &regs)?;
        self.last_clone = None;
        self.run_to_syscall_stop()?; // entry
        self.run_to_syscall_stop()?; // exit
        Ok(ptrace::getregs(self.tid)?.rax as i64)
    }

    /// Like `call`, but a negative result becomes an error naming `what`.
    pub fn check(&mut self, what: &str, nr: i64, args: &[u64]) -> Result<u64> {
        let r = self.call(nr, args)?;
        if r < 0 && r > -4096 {
            return Err(Error::sys(
                format!("{what} (in pid {})", self.tid),
                nix::errno::Errno::from_raw(-r as i32),
            ));
        }
        Ok(r as u64)
    }

    fn run_to_syscall_stop(&mut self) -> Result<()> {
        ptrace::syscall(self.tid, 0)?;
        loop {
            match ptrace::wait(self.tid)? {
                Stop::Syscall => return Ok(()),
                Stop::Signal(sig) => {
                    // Hold it back: the thread is not running its own code now.
                    self.intercepted = sig;
                    ptrace::syscall(self.tid, 0)?;
                }
                Stop::Event(ev) => {
                    if ev == libc::PTRACE_EVENT_CLONE || ev == libc::PTRACE_EVENT_FORK {
                        self.last_clone = Some(event_msg(self.tid)? as i32);
                    }
                    ptrace::syscall(self.tid, 0)?;
                }
                Stop::Exited => {
                    return Err(Error::Restore(format!(
                        "thread {} exited during injection",
                        self.tid
                    )))
                }
            }
        }
    }
}

fn event_msg(tid: i32) -> Result<u64> {
    let mut msg: libc::c_ulong = 0;
    // SAFETY: data points at one writable c_ulong.
    let r = unsafe { libc::ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut msg) };
    nix::errno::Errno::result(r).map_err(|e| Error::sys("PTRACE_GETEVENTMSG", e))?;
    Ok(msg)
}

/// Finds a `syscall` instruction the thread can use: the one it is stopped
/// after, if it is inside a syscall, else one in its [vdso].
pub fn find_syscall_ip(mem: &ProcMem, regs: &Regs, maps: &[MapsEntry]) -> Result<u64> {
    if (regs.orig_rax as i64) >= 0 {
        let mut b = [0u8; 2];
        if mem.read(regs.rip - 2, &mut b).is_ok() && b == [0x0f, 0x05] {
            return Ok(regs.rip - 2);
        }
    }
    for m in maps.iter().filter(|m| m.exec && m.path == "[vdso]") {
        let mut code = vec![0u8; m.len() as usize];
        mem.read(m.start, &mut code)?;
        if let Some(i) = code.windows(2).position(|w| w == [0x0f, 0x05]) {
            return Ok(m.start + i as u64);
        }
    }
    Err(Error::Restore(
        "no syscall instruction found in the target (no [vdso] and not stopped in a syscall)"
            .into(),
    ))
}
