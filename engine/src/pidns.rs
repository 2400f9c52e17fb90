//! Resume into a new PID namespace (`--pid-ns new`), where every process
//! gets its original pid back, so that a clone never collides with its
//! original (or with another clone).
//!
//! The kernel gives a new namespace's first process pid 1 and refuses any
//! other pid until a pid 1 exists; so a tiny init comes first: it is made
//! with clone3(CLONE_NEWPID), forks the root puppet with clone3(set_tid =
//! its original pid), and then only reaps children, exiting with the last
//! one (the namespace ends with it). The rest of the tree is forked inside
//! the namespace with set_tid, like `--same-pid` does outside.

use crate::error::{Error, Result};
use crate::puppet::Puppet;
use crate::sys;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Makes the init of a new PID namespace and in it a root puppet with pid
/// `pid`; returns the puppet, seized.
pub fn spawn(pid: i32) -> Result<Puppet> {
    let (init_rd, init_wr) = pipe()?;
    let (res_rd, res_wr) = pipe()?;
    // SAFETY: the child only makes raw syscalls before _exit (see `intermediate`).
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(Error::sys("fork", nix::errno::Errno::last()));
    }
    if child == 0 {
        // SAFETY: async-signal-safe calls only.
        unsafe { intermediate(init_wr.as_raw_fd(), res_wr.as_raw_fd(), pid) }
    }
    drop(init_wr);
    drop(res_wr);
    let init = read_i64(&init_rd)?;
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    if init < 0 {
        return Err(Error::sys(
            "clone3(CLONE_NEWPID) (a new PID namespace needs CAP_SYS_ADMIN)",
            nix::errno::Errno::from_raw(-init as i32),
        ));
    }
    let inner = read_i64(&res_rd)?;
    if inner < 0 {
        return Err(Error::sys(
            format!("create pid {pid} in the new PID namespace"),
            nix::errno::Errno::from_raw(-inner as i32),
        ));
    }
    Puppet::attach(only_child(init as i32)?)
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe().map_err(|e| Error::sys("pipe", e))
}

fn read_i64(fd: &OwnedFd) -> Result<i64> {
    let mut b = [0u8; 8];
    let n = nix::unistd::read(fd, &mut b)
        .map_err(|e| Error::sys("read from the namespace's init", e))?;
    if n != 8 {
        return Err(Error::Restore(
            "the new PID namespace's init died before reporting".into(),
        ));
    }
    Ok(i64::from_ne_bytes(b))
}

/// The init's one child (the root puppet), as this namespace numbers it.
fn only_child(init: i32) -> Result<i32> {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
            .map_err(|e| Error::io("list the namespace init's children", e))?;
        if let Some(c) = text.split_whitespace().next().and_then(|c| c.parse().ok()) {
            return Ok(c);
        }
        if t0.elapsed() > Duration::from_secs(5) {
            return Err(Error::Restore(
                "the new PID namespace's root process did not appear".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Raw clone3 with the given flags and set_tid; -errno on failure.
unsafe fn clone3(flags: u64, set_tid: Option<&[i32; 1]>) -> i64 {
    let args = sys::CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid.map_or(0, |t| t.as_ptr() as u64),
        set_tid_size: set_tid.is_some() as u64,
        ..Default::default()
    };
    // SAFETY: args is a valid clone_args of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args,
            std::mem::size_of::<sys::CloneArgs>(),
        )
    };
    if r < 0 {
        // SAFETY: reading errno.
        -(unsafe { *libc::__errno_location() }) as i64
    } else {
        r
    }
}

/// The intermediate child: makes the init, reports its pid, exits (so the
/// init is reparented away from the resumer and outlives it).
unsafe fn intermediate(init_wr: i32, res_wr: i32, pid: i32) -> ! {
    // SAFETY (whole body): raw syscalls on values we own.
    unsafe {
        let r = clone3(libc::CLONE_NEWPID as u64, None);
        if r == 0 {
            init(res_wr, pid)
        }
        libc::write(init_wr, (&r as *const i64).cast(), 8);
        libc::_exit(0)
    }
}

/// pid 1 of the namespace: fork the root puppet, then reap until no child is left.
unsafe fn init(res_wr: i32, pid: i32) -> ! {
    // SAFETY (whole body): raw syscalls on values we own.
    unsafe {
        let r = clone3(0, Some(&[pid]));
        if r == 0 {
            libc::setsid();
            loop {
                libc::pause();
            }
        }
        libc::write(res_wr, (&r as *const i64).cast(), 8);
        if r < 0 {
            libc::_exit(1)
        }
        // Hold nothing: the resumer's objects must close with their users.
        libc::syscall(libc::SYS_close_range, 0, u32::MAX, 0);
        loop {
            let mut st = 0;
            if libc::waitpid(-1, &mut st, libc::__WALL) < 0
                && *libc::__errno_location() == libc::ECHILD
            {
                libc::_exit(0)
            }
        }
    }
}
