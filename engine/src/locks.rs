//! File locks: POSIX (fcntl F_SETLK, owned by the process), OFD (owned by
//! the open file description) and flock.
//!
//! /proc/PID/fdinfo/N lists, on "lock:" lines, the locks held through that
//! fd; those are taken again from inside the puppet once its fds are in
//! place, non-blocking: a lock someone else took meanwhile makes the resume
//! fail with a clear error instead of waiting or going without it. Locks a
//! thread is waiting for ("->" lines) are not held: its syscall restarts.

use crate::error::{Error, Result};
use crate::image::{Fd, FileLock, LockKind};
use crate::puppet::Puppet;

/// Locks held through `fd` of `pid`.
pub fn parse(pid: i32, fd: i32) -> Result<Vec<FileLock>> {
    let text = crate::proc::read_proc(pid, &format!("fdinfo/{fd}"))?;
    let mut out = Vec::new();
    for l in text.lines().filter_map(|l| l.strip_prefix("lock:")) {
        // "1: POSIX  ADVISORY  WRITE 1234 fe:00:567 0 EOF"
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.len() < 8 || w[1] == "->" {
            continue;
        }
        let kind = match w[1] {
            "POSIX" => LockKind::Posix,
            "OFDLCK" => LockKind::Ofd,
            "FLOCK" => LockKind::Flock,
            other => {
                return Err(Error::Unsupported {
                    pid,
                    what: format!("fd {fd} holds a {other} lock, which snapshots do not support: release it first"),
                })
            }
        };
        if w[2] != "ADVISORY" {
            return Err(Error::Unsupported {
                pid,
                what: format!("fd {fd} holds a mandatory or lease lock ({l}): release it first"),
            });
        }
        out.push(FileLock {
            kind,
            write: w[3] == "WRITE",
            start: w[6].parse().unwrap_or(0),
            end: w[7].parse().ok(),
        });
    }
    Ok(out)
}

/// Takes every lock of the image's fds again, in the puppet.
pub fn restore(p: &mut Puppet, fds: &[Fd]) -> Result<()> {
    for f in fds {
        for l in &f.locks {
            let r = match l.kind {
                LockKind::Flock => {
                    let op = if l.write {
                        libc::LOCK_EX
                    } else {
                        libc::LOCK_SH
                    };
                    p.main
                        .call(libc::SYS_flock, &[f.fd as u64, (op | libc::LOCK_NB) as u64])?
                }
                LockKind::Posix | LockKind::Ofd => {
                    let cmd = if l.kind == LockKind::Posix {
                        libc::F_SETLK
                    } else {
                        libc::F_OFD_SETLK
                    };
                    // struct flock: type, whence (shorts), start, len, pid.
                    let mut fl = [0u8; 32];
                    let ty = if l.write {
                        libc::F_WRLCK
                    } else {
                        libc::F_RDLCK
                    } as i16;
                    fl[0..2].copy_from_slice(&ty.to_ne_bytes());
                    fl[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_ne_bytes());
                    fl[8..16].copy_from_slice(&l.start.to_ne_bytes());
                    let len = l.end.map_or(0, |e| e + 1 - l.start);
                    fl[16..24].copy_from_slice(&len.to_ne_bytes());
                    let addr = p.put(0, &fl)?;
                    p.main
                        .call(libc::SYS_fcntl, &[f.fd as u64, cmd as u64, addr])?
                }
            };
            if r == -(libc::EAGAIN as i64)
                || r == -(libc::EACCES as i64)
                || r == -(libc::EWOULDBLOCK as i64)
            {
                return Err(Error::Restore(format!(
                    "fd {} held a {:?} lock that another process holds now: release it, then resume again",
                    f.fd, l.kind
                )));
            }
            if r < 0 {
                return Err(Error::sys(
                    format!("retake a {:?} lock on fd {}", l.kind, f.fd),
                    nix::errno::Errno::from_raw(-r as i32),
                ));
            }
        }
    }
    Ok(())
}
