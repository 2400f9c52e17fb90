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

    /// Runs `calls` in order inside the thread with one ptrace round trip:
    /// the batch loop (`BATCH_LOOP`, mapped at `code`) walks a table at
    /// `table` that we fill, and stops at the first failure. Injecting each
    /// call alone costs a ptrace round trip (tens of microseconds here);
    /// a resume makes hundreds of calls.
    pub fn batch(
        &mut self,
        mem: &ProcMem,
        code: u64,
        table: u64,
        calls: &[Call],
    ) -> Result<Vec<u64>> {
        if calls.is_empty() {
            return Ok(vec![]);
        }
        let mut raw = Vec::with_capacity((calls.len() + 1) * ENTRY);
        for c in calls {
            raw.extend_from_slice(&(c.nr as u64).to_ne_bytes());
            for a in c.args {
                raw.extend_from_slice(&a.to_ne_bytes());
            }
            raw.extend_from_slice(&NOT_RUN.to_ne_bytes());
        }
        raw.extend_from_slice(&u64::MAX.to_ne_bytes());
        mem.write(table, &raw)?;
        let mut regs = self.base;
        regs.rip = code;
        regs.rbx = table;
        regs.orig_rax = u64::MAX;
        ptrace::setregs(self.tid, &regs)?;
        ptrace::cont(self.tid, 0)?;
        loop {
            match ptrace::wait(self.tid)? {
                Stop::Signal(libc::SIGTRAP) => break,
                Stop::Signal(sig) => {
                    self.intercepted = sig;
                    ptrace::cont(self.tid, 0)?;
                }
                Stop::Event(_) | Stop::Syscall => ptrace::cont(self.tid, 0)?,
                Stop::Exited => {
                    return Err(Error::Restore(format!(
                        "thread {} exited in a batch",
                        self.tid
                    )))
                }
            }
        }
        let mut out = vec![0u8; calls.len() * ENTRY];
        mem.read(table, &mut out)?;
        let mut results = Vec::with_capacity(calls.len());
        for (i, c) in calls.iter().enumerate() {
            let r = u64::from_ne_bytes(out[i * ENTRY + 56..i * ENTRY + 64].try_into().expect("8"));
            let e = r as i64;
            if r == NOT_RUN || (-4095..0).contains(&e) {
                let errno = if r == NOT_RUN {
                    nix::errno::Errno::ECANCELED
                } else {
                    nix::errno::Errno::from_raw(-e as i32)
                };
                return Err(Error::sys(
                    format!("{} (in pid {})", c.what, self.tid),
                    errno,
                ));
            }
            results.push(r);
        }
        Ok(results)
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

/// One syscall of a batch, with what to call it in an error.
pub struct Call {
    pub nr: i64,
    pub args: [u64; 6],
    pub what: String,
}

impl Call {
    pub fn new(what: impl Into<String>, nr: i64, a: &[u64]) -> Call {
        let mut args = [0u64; 6];
        args[..a.len()].copy_from_slice(a);
        Call {
            nr,
            args,
            what: what.into(),
        }
    }
}

/// Bytes per batch table entry: nr, six arguments, result.
pub const ENTRY: usize = 64;
/// The result slot's value before the call runs.
const NOT_RUN: u64 = 0xdead_0000_0000_0000;

/// The batch loop, hand-assembled because it runs in a process with no
/// libraries mapped; rbx points at the table:
///
/// ```text
/// 0:  mov rax, [rbx]         ; nr, or -1 at the end
///     cmp rax, -1
///     je  done
///     mov rdi, [rbx+8] ; rsi, rdx, r10, r8, r9 likewise
///     syscall
///     mov [rbx+56], rax      ; the result
///     cmp rax, -4095         ; stop at the first error
///     jae done
///     add rbx, 64
///     jmp 0
/// done: int3                 ; SIGTRAP: the tracer takes over
/// ```
pub const BATCH_LOOP: [u8; 54] = [
    0x48, 0x8b, 0x03, // mov rax, [rbx]
    0x48, 0x83, 0xf8, 0xff, // cmp rax, -1
    0x74, 0x2c, // je done
    0x48, 0x8b, 0x7b, 0x08, // mov rdi, [rbx+8]
    0x48, 0x8b, 0x73, 0x10, // mov rsi, [rbx+16]
    0x48, 0x8b, 0x53, 0x18, // mov rdx, [rbx+24]
    0x4c, 0x8b, 0x53, 0x20, // mov r10, [rbx+32]
    0x4c, 0x8b, 0x43, 0x28, // mov r8, [rbx+40]
    0x4c, 0x8b, 0x4b, 0x30, // mov r9, [rbx+48]
    0x0f, 0x05, // syscall
    0x48, 0x89, 0x43, 0x38, // mov [rbx+56], rax
    0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, // cmp rax, -4095
    0x73, 0x06, // jae done
    0x48, 0x83, 0xc3, 0x40, // add rbx, 64
    0xeb, 0xcb, // jmp 0
    0xcc, // done: int3
];

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

pub const CODE_LEN: u64 = 4096;
pub const SCRATCH_LEN: u64 = 512 * 1024;
/// The scratch area: data (paths, structs) first, then the batch table.
const DATA_LEN: u64 = 448 * 1024;
const TABLE_ENTRIES: usize = ((SCRATCH_LEN - DATA_LEN) as usize) / ENTRY - 1;
/// Offset of the batch loop in the code page (a lone `syscall` sits at 0).
const LOOP_OFFSET: u64 = 16;

/// An injection area in a process: a code page (a lone `syscall` at 0, the
/// batch loop at 16) followed by a scratch area for data and batch tables.
#[derive(Clone, Copy, Debug)]
pub struct Area {
    pub addr: u64,
}

impl Area {
    /// Maps an area (at `at`, or where the kernel likes) with the thread
    /// `r`, and writes its code.
    pub fn map(r: &mut Remote, mem: &ProcMem, at: Option<u64>) -> Result<Area> {
        let prot = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        if at.is_some() {
            flags |= crate::sys::MAP_FIXED_NOREPLACE;
        }
        let args = [
            at.unwrap_or(0),
            CODE_LEN + SCRATCH_LEN,
            prot as u64,
            flags as u64,
            u64::MAX,
            0,
        ];
        let addr = r.check("mmap an injection area", libc::SYS_mmap, &args)?;
        if at.is_some_and(|a| a != addr) {
            return Err(Error::Restore(format!(
                "injection area mapped at {addr:#x}, not {:#x}",
                at.unwrap_or(0)
            )));
        }
        mem.write(addr, &[0x0f, 0x05])?;
        mem.write(addr + LOOP_OFFSET, &BATCH_LOOP)?;
        Ok(Area { addr })
    }

    pub fn scratch(&self) -> u64 {
        self.addr + CODE_LEN
    }

    pub fn batch(&self) -> Batch {
        Batch {
            base: self.scratch(),
            data: vec![],
            calls: vec![],
        }
    }

    /// Runs a batch in thread `r`; returns each call's result.
    pub fn run(&self, r: &mut Remote, mem: &ProcMem, b: Batch) -> Result<Vec<u64>> {
        mem.write(self.scratch(), &b.data)?;
        let mut results = Vec::with_capacity(b.calls.len());
        for chunk in b.calls.chunks(TABLE_ENTRIES) {
            results.extend(r.batch(
                mem,
                self.addr + LOOP_OFFSET,
                self.scratch() + DATA_LEN,
                chunk,
            )?);
        }
        Ok(results)
    }
}

/// Syscalls to run in one go, and the data (paths, structs) they point at,
/// staged for an area's scratch space.
pub struct Batch {
    base: u64,
    data: Vec<u8>,
    calls: Vec<Call>,
}

impl Batch {
    /// Stages bytes; returns the address they will have in the process.
    pub fn data(&mut self, bytes: &[u8]) -> Result<u64> {
        let at = self.data.len().next_multiple_of(8);
        if (at + bytes.len()) as u64 > DATA_LEN {
            return Err(Error::Restore(
                "injection scratch area full (too much data in one step)".into(),
            ));
        }
        self.data.resize(at, 0);
        self.data.extend_from_slice(bytes);
        Ok(self.base + at as u64)
    }

    /// Stages a NUL-terminated path.
    pub fn path(&mut self, path: &str) -> Result<u64> {
        let mut b = path.as_bytes().to_vec();
        b.push(0);
        self.data(&b)
    }

    pub fn call(&mut self, what: impl Into<String>, nr: i64, args: &[u64]) {
        self.calls.push(Call::new(what, nr, args));
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// How many calls are staged (the index the next call will have).
    pub fn calls_len(&self) -> usize {
        self.calls.len()
    }

    /// Where the staged data starts in the process (read results back from there).
    pub fn base(&self) -> u64 {
        self.base
    }
}
