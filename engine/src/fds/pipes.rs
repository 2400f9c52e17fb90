//! Pipes and FIFOs, with the bytes buffered in them.
//!
//! The buffer belongs to the pipe, not to an end, so it is saved once per
//! pipe inode. Reading it would drain it from the running target, so the
//! dump opens a read end of its own (through /proc/PID/fd/N, which works for
//! pipes as for FIFOs) and tee(2)s the contents into a private pipe, which
//! copies without consuming. The resume makes a new pipe (or opens the FIFO
//! by its path), sizes it, writes the bytes back, and hands out one open
//! file description per end the image had.

use super::{check, Target};
use crate::error::{Error, IoContext, Result};
use crate::image::{FileObject, ObjectKind, PipeBuffer};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Pipe inode -> (read end held, write end held) over the given processes.
pub fn ends(pids: &[i32]) -> Result<HashMap<u64, (bool, bool)>> {
    let mut out: HashMap<u64, (bool, bool)> = HashMap::new();
    for &pid in pids {
        for fd in crate::proc::fds(pid)? {
            let Ok(link) = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")) else {
                continue;
            };
            let link = link.to_string_lossy();
            let Some(ino) = link
                .strip_prefix("pipe:[")
                .and_then(|r| r.trim_end_matches(']').parse::<u64>().ok())
            else {
                continue;
            };
            let info = crate::proc::fdinfo(pid, fd)?;
            let flags = info
                .get("flags")
                .and_then(|f| i32::from_str_radix(f, 8).ok())
                .unwrap_or(0);
            let e = out.entry(ino).or_default();
            match flags & libc::O_ACCMODE {
                libc::O_RDONLY => e.0 = true,
                libc::O_WRONLY => e.1 = true,
                _ => *e = (true, true),
            }
        }
    }
    Ok(out)
}

pub fn dump(t: &Target, buffers: &mut Vec<PipeBuffer>) -> Result<ObjectKind> {
    let ino: u64 = t.info.get("ino").and_then(|i| i.parse().ok()).unwrap_or(0);
    let fifo = t.link.starts_with('/').then(|| t.link.to_string());
    if t.flags & libc::O_ACCMODE == libc::O_RDWR && fifo.is_none() {
        return Err(t.unsupported("is a pipe opened for reading and writing, which cannot be recreated: open its ends separately"));
    }
    if !buffers.iter().any(|b| b.ino == ino) {
        let (size, data) = peek(t)?;
        buffers.push(PipeBuffer { ino, size, data });
    }
    Ok(ObjectKind::Pipe {
        ino,
        write: t.flags & libc::O_ACCMODE != libc::O_RDONLY,
        path: fifo,
    })
}

/// The pipe's capacity and a copy of its buffered bytes, left in place.
fn peek(t: &Target) -> Result<(u32, Vec<u8>)> {
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(t.proc_path())
        .ctx(|| format!("open a read end of fd {} of pid {}", t.fd, t.pid))?;
    let rfd = reader.as_raw_fd();
    // SAFETY: F_GETPIPE_SZ takes no argument.
    let size = check(unsafe { libc::fcntl(rfd, libc::F_GETPIPE_SZ) } as _, || {
        "F_GETPIPE_SZ".into()
    })? as u32;
    let (copy_r, copy_w) = pipe()?;
    // SAFETY: F_SETPIPE_SZ takes an int.
    unsafe { libc::fcntl(copy_w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    // SAFETY: tee between two pipe descriptors we hold.
    let n = unsafe {
        libc::tee(
            rfd,
            copy_w.as_raw_fd(),
            size as usize,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 && nix::errno::Errno::last() != nix::errno::Errno::EAGAIN {
        return Err(Error::sys("tee a pipe's buffer", nix::errno::Errno::last()));
    }
    let mut data = vec![0u8; n.max(0) as usize];
    let mut got = 0;
    while got < data.len() {
        let r = nix::unistd::read(&copy_r, &mut data[got..])
            .map_err(|e| Error::sys("read a copy of a pipe's buffer", e))?;
        if r == 0 {
            break;
        }
        got += r;
    }
    data.truncate(got);
    Ok((size, data))
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe2", e))
}

/// Creates every pipe end of the image: id -> descriptor. FIFO holders
/// (read-write opens that keep the FIFO's buffer alive) go into `keep`.
pub fn create(
    objects: &[FileObject],
    buffers: &[PipeBuffer],
    keep: &mut Vec<OwnedFd>,
) -> Result<HashMap<u32, OwnedFd>> {
    let mut out = HashMap::new();
    for b in buffers {
        let ends: Vec<(u32, bool, Option<&String>, i32)> = objects
            .iter()
            .filter_map(|o| match &o.kind {
                ObjectKind::Pipe { ino, write, path } if *ino == b.ino => {
                    Some((o.id, *write, path.as_ref(), o.flags & libc::O_ACCMODE))
                }
                _ => None,
            })
            .collect();
        let fifo = ends.iter().find_map(|e| e.2);
        let (r, w, holder) = match fifo {
            Some(path) => open_fifo(path)?,
            None => {
                let (r, w) = pipe()?;
                (r, w, None)
            }
        };
        // SAFETY: F_SETPIPE_SZ takes an int.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, b.size as libc::c_int) };
        fill(&w, &b.data)?;
        let mut spare = [Some(r), Some(w)];
        let mut first = [-1, -1];
        for (id, write, path, mode) in ends {
            if let (Some(path), libc::O_RDWR) = (path, mode) {
                out.insert(id, open_rw(path)?);
                continue;
            }
            let end = write as usize;
            let fd = match spare[end].take() {
                Some(fd) => fd,
                // A second description of one end (a FIFO opened twice,
                // a pipe reopened through /proc): open that end again.
                None => reopen(&format!("/proc/self/fd/{}", first[end]), write)?,
            };
            first[end] = fd.as_raw_fd();
            out.insert(id, fd);
        }
        keep.extend(holder);
    }
    Ok(out)
}

/// Opens a FIFO: a read-write holder first (so that opening either end
/// never blocks), then one read and one write end, non-blocking.
fn open_fifo(path: &str) -> Result<(OwnedFd, OwnedFd, Option<OwnedFd>)> {
    let rw = open_rw(path)?;
    Ok((reopen(path, false)?, reopen(path, true)?, Some(rw)))
}

fn open_rw(path: &str) -> Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ctx(|| format!("open FIFO {path} (it must exist at resume)"))?;
    Ok(f.into())
}

fn reopen(path: &str, write: bool) -> Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ctx(|| format!("open {path} (a FIFO must exist at resume)"))?;
    Ok(f.into())
}

fn fill(w: &OwnedFd, data: &[u8]) -> Result<()> {
    let mut done = 0;
    while done < data.len() {
        let n = nix::unistd::write(w, &data[done..])
            .map_err(|e| Error::sys("refill a pipe's buffer", e))?;
        done += n;
    }
    Ok(())
}
