//! The puppet: a fresh process that the resumer sculpts into the image's
//! process with injected syscalls (DESIGN.md, "how a resume flows").
//!
//! It is born by a double fork, so that it is reparented away from the
//! resumer and outlives it, in a session of its own; it waits in pause()
//! until seized. It is seized with PTRACE_O_EXITKILL: should the resumer die
//! half way, the half-built process dies with it instead of running.
//!
//! Its syscalls run from a private code page holding one `syscall`
//! instruction, next to a scratch data page for arguments, so that the
//! puppet's own mappings (umlctl's) can all be removed.

use crate::error::{Error, Result};
use crate::inject::{self, Remote};
use crate::mem::ProcMem;
use crate::proc;
use crate::ptrace;
use crate::sys;
use nix::sys::ptrace::Options;

use crate::inject::Area;
pub use crate::inject::{Batch, CODE_LEN, SCRATCH_LEN};

pub struct Puppet {
    pub pid: i32,
    pub mem: ProcMem,
    pub main: Remote,
    /// Our code page and scratch area (see `inject::Area`); start 0 until mapped.
    pub area: u64,
    injection: Area,
}

impl Puppet {
    /// Forks, seizes and stops a puppet (with pid `pid` when given).
    pub fn spawn(pid: Option<i32>) -> Result<Puppet> {
        Puppet::attach(double_fork(pid)?)
    }

    /// Seizes and stops a process waiting in pause() to become a puppet.
    /// Its forks are traced too (a tree's puppets are forked from it).
    pub fn attach(pid: i32) -> Result<Puppet> {
        ptrace::seize(
            pid,
            Options::PTRACE_O_TRACESYSGOOD
                | Options::PTRACE_O_TRACECLONE
                | Options::PTRACE_O_TRACEFORK
                | Options::PTRACE_O_EXITKILL,
        )?;
        ptrace::interrupt(pid)?;
        if !ptrace::wait_frozen(pid)? {
            return Err(Error::Restore(
                "the puppet process died before it was seized".into(),
            ));
        }
        let regs = ptrace::getregs(pid)?;
        let mem = ProcMem::open(pid)?;
        let ip = inject::find_syscall_ip(&mem, &regs, &proc::maps(pid)?)?;
        Ok(Puppet {
            pid,
            mem,
            main: Remote::new(pid, ip, regs),
            area: 0,
            injection: Area { addr: 0 },
        })
    }

    /// A puppet made some other way (a child cloned from a puppet), with
    /// no injection area yet.
    pub fn adopt(pid: i32, mem: ProcMem, main: Remote) -> Puppet {
        Puppet {
            pid,
            mem,
            main,
            area: 0,
            injection: Area { addr: 0 },
        }
    }

    /// The puppet a fork of this one made (`pid`, stopped and traced): it
    /// has the same memory, so the same injection area.
    pub fn forked(&self, pid: i32) -> Result<Puppet> {
        Ok(Puppet {
            pid,
            mem: ProcMem::open(pid)?,
            main: Remote::new(pid, self.main.ip, ptrace::getregs(pid)?),
            area: self.area,
            injection: Area {
                addr: self.injection.addr,
            },
        })
    }

    pub fn scratch(&self) -> u64 {
        self.area + CODE_LEN
    }

    /// Maps the code and scratch pages at `addr` and moves injection there.
    pub fn map_area(&mut self, addr: u64) -> Result<()> {
        self.injection = Area::map(&mut self.main, &self.mem, Some(addr))?;
        self.area = addr;
        self.main.ip = addr;
        Ok(())
    }

    /// Runs a syscall in the main thread; a failure names `what`.
    pub fn sys(&mut self, what: &str, nr: i64, args: &[u64]) -> Result<u64> {
        self.main.check(what, nr, args)
    }

    /// A new batch of syscalls whose data lives in this puppet's scratch area.
    pub fn batch(&self) -> Batch {
        self.injection.batch()
    }

    /// Runs a batch in the main thread; returns each call's result.
    pub fn run(&mut self, b: Batch) -> Result<Vec<u64>> {
        self.injection.run(&mut self.main, &self.mem, b)
    }

    /// Runs a batch in another thread of the puppet.
    pub fn run_in(&self, r: &mut Remote, b: Batch) -> Result<Vec<u64>> {
        self.injection.run(r, &self.mem, b)
    }

    /// Copies bytes into the scratch page at `offset`; returns their address.
    pub fn put(&self, offset: u64, bytes: &[u8]) -> Result<u64> {
        assert!(
            offset + bytes.len() as u64 <= SCRATCH_LEN,
            "scratch overflow"
        );
        let addr = self.scratch() + offset;
        self.mem.write(addr, bytes)?;
        Ok(addr)
    }

    /// Copies a NUL-terminated path into the scratch page.
    pub fn put_path(&self, offset: u64, path: &str) -> Result<u64> {
        if path.len() >= 4096 {
            return Err(Error::Restore(format!("path too long: {path}")));
        }
        let mut b = path.as_bytes().to_vec();
        b.push(0);
        self.put(offset, &b)
    }

    /// Opens `path` inside the puppet; returns the new fd.
    pub fn open(&mut self, path: &str, flags: i32, mode: u32) -> Result<i32> {
        let p = self.put_path(0, path)?;
        let fd = self.sys(
            &format!("open {path}"),
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, p, flags as u64, mode as u64],
        )?;
        Ok(fd as i32)
    }

    pub fn close(&mut self, fd: i32) -> Result<()> {
        self.sys("close", libc::SYS_close, &[fd as u64]).map(drop)
    }
}

/// Forks a child that forks the puppet and exits, so the puppet is
/// reparented (to init or the nearest subreaper) and outlives us.
fn double_fork(pid: Option<i32>) -> Result<i32> {
    let (rd, wr) = nix::unistd::pipe().map_err(|e| Error::sys("pipe", e))?;
    // SAFETY: the child only makes raw syscalls (clone3/fork, setsid, write,
    // pause, _exit) before it is replaced: no allocation, no locks.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(Error::sys("fork", nix::errno::Errno::last()));
    }
    if child == 0 {
        // SAFETY: async-signal-safe calls only, see above.
        unsafe { intermediate(wr.as_raw_fd_i32(), pid) }
    }
    drop(wr);
    let mut buf = [0u8; 8];
    let n = nix::unistd::read(&rd, &mut buf).map_err(|e| Error::sys("read puppet pid", e))?;
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    if n != 8 {
        return Err(Error::Restore("the puppet could not be created".into()));
    }
    let v = i64::from_ne_bytes(buf);
    if v < 0 {
        let errno = nix::errno::Errno::from_raw(-v as i32);
        if errno == nix::errno::Errno::EEXIST {
            return Err(Error::PidInUse(pid.unwrap_or(0)));
        }
        return Err(Error::sys("create the puppet process", errno));
    }
    Ok(v as i32)
}

trait RawFdI32 {
    fn as_raw_fd_i32(&self) -> i32;
}
impl RawFdI32 for std::os::fd::OwnedFd {
    fn as_raw_fd_i32(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.as_raw_fd()
    }
}

/// The intermediate child: create the puppet, report its pid, exit.
unsafe fn intermediate(wr: i32, pid: Option<i32>) -> ! {
    // SAFETY (whole body): raw syscalls on values we own.
    unsafe {
        let r: i64 = match pid {
            Some(p) => {
                let tids = [p];
                let args = sys::CloneArgs {
                    exit_signal: libc::SIGCHLD as u64,
                    set_tid: tids.as_ptr() as u64,
                    set_tid_size: 1,
                    ..Default::default()
                };
                let r = libc::syscall(
                    libc::SYS_clone3,
                    &args,
                    std::mem::size_of::<sys::CloneArgs>(),
                );
                if r < 0 {
                    -(*libc::__errno_location()) as i64
                } else {
                    r
                }
            }
            None => {
                let r = libc::fork() as i64;
                if r < 0 {
                    -(*libc::__errno_location()) as i64
                } else {
                    r
                }
            }
        };
        if r == 0 {
            // The puppet: its own session, then wait to be seized.
            libc::setsid();
            loop {
                libc::pause();
            }
        }
        libc::write(wr, (&r as *const i64).cast(), 8);
        libc::_exit(0)
    }
}
