//! File descriptors: what is saved of each, and how it is reopened.
//!
//! Reopened by path here: regular files and directories (path, flags,
//! offset), deleted files (contents saved, restored unlinked), character
//! devices, and std streams that were terminals, sockets or pipes leading
//! out of the snapshot (the resumer decides what they become). Pipes,
//! sockets, epoll, eventfd, signalfd, timerfd, memfd, and in a tree every
//! regular file, are open file descriptions kept as objects (`fds`). The
//! locks held through each fd are in `locks`. Anything else is refused at
//! snapshot time, naming the fd, before any image is written.

use crate::error::{Error, IoContext, Result};
use crate::image::{Fd, FdKind, FileId, ImageWriter};
use crate::proc;
use crate::puppet::Puppet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What std streams that were pipes or terminals become at resume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Stdio {
    /// The resumer's own stdin/stdout/stderr.
    #[default]
    Inherit,
    /// /dev/null.
    Null,
    /// A file: stdin reads it, stdout and stderr append to it (created 0600).
    Path(String),
}

/// Flags that describe an open file (not how it was created).
const KEEP_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_DIRECT
    | libc::O_NOATIME
    | libc::O_LARGEFILE
    | libc::O_DIRECTORY
    | libc::O_SYNC
    | libc::O_DSYNC;

pub fn collect(
    pid: i32,
    writer: &mut ImageWriter,
    objects: &mut crate::fds::Objects,
) -> Result<Vec<Fd>> {
    let mut out = Vec::new();
    for fd in proc::fds(pid)? {
        let link = format!("/proc/{pid}/fd/{fd}");
        let Ok(target) = std::fs::read_link(&link) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let info = proc::fdinfo(pid, fd)?;
        let flags = info
            .get("flags")
            .and_then(|f| i32::from_str_radix(f, 8).ok())
            .unwrap_or(0);
        let pos: u64 = info.get("pos").and_then(|p| p.parse().ok()).unwrap_or(0);
        let meta = std::fs::metadata(&link).ctx(|| format!("stat fd {fd} of pid {pid}"))?;
        let ft = meta.file_type();
        let outer_pipe = target.starts_with("pipe:") && !objects.inner_pipe(&target);
        let t = crate::fds::Target {
            pid,
            fd,
            link: &target,
            info: &info,
            flags,
            ft,
        };
        let outer_socket = ft.is_socket() && !objects.inner_socket(&target);
        let kind = if fd <= 2 && (outer_pipe || outer_socket || is_tty(&target, &ft)) {
            FdKind::Stdio {
                was: target.clone(),
                flags: flags & KEEP_FLAGS,
            }
        } else if let Some(id) = objects.object(&t, writer)? {
            FdKind::Object { id }
        } else if ft.is_file() && target.ends_with(" (deleted)") {
            let content =
                std::fs::read(&link).ctx(|| format!("read deleted file behind fd {fd}"))?;
            let offset = writer.append_padded(&content)?;
            let path = target.trim_end_matches(" (deleted)").to_string();
            FdKind::DeletedFile {
                path,
                flags: flags & KEEP_FLAGS,
                pos,
                len: content.len() as u64,
                offset,
            }
        } else if (ft.is_file() || ft.is_dir()) && target.starts_with('/') {
            let id = FileId::of(Path::new(&target)).ctx(|| format!("stat {target} (fd {fd})"))?;
            FdKind::File {
                path: target.clone(),
                flags: flags & KEEP_FLAGS,
                pos,
                id,
            }
        } else if ft.is_char_device() && target.starts_with("/dev/") {
            FdKind::CharDev {
                path: target.clone(),
                flags: flags & KEEP_FLAGS,
            }
        } else {
            return Err(Error::Unsupported {
                pid,
                what: unsupported_fd(fd, &target),
            });
        };
        out.push(Fd {
            fd,
            cloexec: flags & libc::O_CLOEXEC != 0,
            kind,
            locks: crate::locks::parse(pid, fd)?,
        });
    }
    Ok(out)
}

fn is_tty(target: &str, ft: &std::fs::FileType) -> bool {
    ft.is_char_device()
        && (target.starts_with("/dev/pts/")
            || target.starts_with("/dev/tty")
            || target == "/dev/console")
}

fn unsupported_fd(fd: i32, target: &str) -> String {
    let what = match target.split(':').next().unwrap_or("") {
        "anon_inode" => "a kernel object",
        _ => "of a kind",
    };
    format!("fd {fd} ({target}) is {what} that snapshots do not support (supported: files, devices, pipes, FIFOs, sockets, epoll, eventfd, signalfd, timerfd, memfd): close it in the program before the snapshot")
}

/// Reopens every fd of the image inside the puppet, at its number, in one
/// batch: the fd each open will return is known in advance (the lowest free
/// one; nothing else runs in the puppet), so its dup3 and close can follow
/// in the same batch. The results are checked against the prediction.
///
/// Objects come from the `Installer`: every puppet inherited them at fds
/// from `base` up, which are closed at the end. `pids` maps the image's
/// pids to the new ones (for O_ASYNC owners).
pub fn restore(
    p: &mut Puppet,
    process: &crate::image::Process,
    objects: &[crate::image::FileObject],
    installer: &crate::fds::Installer,
    pages: &[u8],
    stdio: &Stdio,
    pids: &std::collections::HashMap<i32, i32>,
) -> Result<()> {
    let fds = &process.fds;
    let mut open: std::collections::BTreeSet<i32> = match stdio {
        Stdio::Inherit => fds
            .iter()
            .filter(|f| matches!(f.kind, FdKind::Stdio { .. }) && f.fd <= 2)
            .map(|f| f.fd)
            .collect(),
        _ => Default::default(),
    };
    let mut b = p.batch();
    for fd in (0..3).filter(|fd| !open.contains(fd)) {
        b.call("close", libc::SYS_close, &[fd as u64]);
    }
    b.call(
        "close_range",
        libc::SYS_close_range,
        &[3, installer.base as u64 - 1, 0],
    );
    // Deleted files recreated for the puppet to open (see `open_spec`).
    let mut keep_alive = Vec::new();
    let mut predicted = Vec::new();
    for f in fds {
        if let FdKind::Object { id } = f.kind {
            let from = installer.fd(id)?;
            b.call("dup3", libc::SYS_dup3, &[from as u64, f.fd as u64, 0]);
            open.insert(f.fd);
        }
        let (path, flags, mode) = open_spec(f, stdio, pages, &mut keep_alive)?;
        if !path.is_empty() {
            let nfd = (0..).find(|n| !open.contains(n)).expect("a free fd");
            let addr = b.path(&path)?;
            predicted.push((b.calls_len(), nfd as u64));
            b.call(
                format!("open {path} for fd {}", f.fd),
                libc::SYS_openat,
                &[libc::AT_FDCWD as u64, addr, flags as u64, mode],
            );
            if nfd != f.fd {
                b.call("dup3", libc::SYS_dup3, &[nfd as u64, f.fd as u64, 0]);
                b.call("close", libc::SYS_close, &[nfd as u64]);
            }
            open.insert(f.fd);
        }
        let cloexec = if f.cloexec { libc::FD_CLOEXEC } else { 0 };
        b.call(
            "fcntl(F_SETFD)",
            libc::SYS_fcntl,
            &[f.fd as u64, libc::F_SETFD as u64, cloexec as u64],
        );
        if let FdKind::File { pos, .. } | FdKind::DeletedFile { pos, .. } = f.kind {
            b.call(
                "lseek",
                libc::SYS_lseek,
                &[f.fd as u64, pos, libc::SEEK_SET as u64],
            );
        }
    }
    let results = p.run(b)?;
    for (i, want) in predicted {
        if results[i] != want {
            return Err(Error::Restore(format!(
                "open returned fd {} where {want} was expected",
                results[i]
            )));
        }
    }
    drop(keep_alive);
    p.sys(
        "close the resumer's objects",
        libc::SYS_close_range,
        &[installer.base as u64, u32::MAX as u64, 0],
    )?;
    objects_after_install(p, process, objects, pids)?;
    crate::locks::restore(p, fds)
}

/// What the puppet opens for `f`: (path, flags, mode); an empty path for
/// nothing (inherited std streams, objects). Deleted files are recreated
/// here and reached through /proc/<us>/fd; `keep_alive` holds them until
/// the puppet has opened them.
fn open_spec(
    f: &Fd,
    stdio: &Stdio,
    pages: &[u8],
    keep_alive: &mut Vec<std::fs::File>,
) -> Result<(String, i32, u64)> {
    Ok(match &f.kind {
        FdKind::File { path, flags, .. } | FdKind::CharDev { path, flags } => {
            (path.clone(), *flags | libc::O_NOCTTY, 0)
        }
        FdKind::DeletedFile {
            path,
            flags,
            len,
            offset,
            ..
        } => {
            let data = &pages[*offset as usize..(*offset + *len) as usize];
            let file = recreate_deleted(path, data)?;
            let via = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd());
            keep_alive.push(file);
            (via, *flags & !libc::O_CREAT, 0)
        }
        FdKind::Object { .. } => (String::new(), 0, 0),
        FdKind::Stdio { flags, .. } => match stdio {
            Stdio::Inherit => (String::new(), 0, 0),
            Stdio::Null => ("/dev/null".into(), *flags & libc::O_ACCMODE, 0),
            Stdio::Path(path) if f.fd == 0 => (path.clone(), libc::O_RDONLY, 0),
            Stdio::Path(path) => (
                path.clone(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
                0o600,
            ),
        },
    })
}

/// What needs every fd at its number: epoll registrations (keyed by fd
/// number) and O_ASYNC owners (pids of the new processes).
fn objects_after_install(
    p: &mut Puppet,
    process: &crate::image::Process,
    objects: &[crate::image::FileObject],
    pids: &std::collections::HashMap<i32, i32>,
) -> Result<()> {
    use crate::image::ObjectKind;
    for f in &process.fds {
        let FdKind::Object { id } = f.kind else {
            continue;
        };
        let Some(o) = objects.iter().find(|o| o.id == id) else {
            continue;
        };
        if let ObjectKind::Epoll { owner, items } = &o.kind {
            if *owner == process.pid {
                crate::fds::epoll::register(p, f.fd, items)?;
            }
        }
        if let Some((kind, pid, sig)) = o.owner {
            let own = crate::sys::FOwnerEx {
                type_: kind,
                pid: pids.get(&pid).copied().unwrap_or(pid),
            };
            let addr = p.put(0, crate::sys::as_bytes(&own))?;
            p.sys(
                "fcntl(F_SETOWN_EX)",
                libc::SYS_fcntl,
                &[f.fd as u64, crate::sys::F_SETOWN_EX as u64, addr],
            )?;
            p.sys(
                "fcntl(F_SETSIG)",
                libc::SYS_fcntl,
                &[f.fd as u64, crate::sys::F_SETSIG as u64, sig as u64],
            )?;
            p.sys(
                "fcntl(F_SETFL O_ASYNC)",
                libc::SYS_fcntl,
                &[
                    f.fd as u64,
                    libc::F_SETFL as u64,
                    (o.flags & (libc::O_ASYNC | libc::O_NONBLOCK | libc::O_APPEND)) as u64,
                ],
            )?;
        }
    }
    Ok(())
}

/// Recreates a deleted file as an unnamed file (O_TMPFILE) in its old
/// directory, or in /tmp if that is gone.
fn recreate_deleted(path: &str, data: &[u8]) -> Result<std::fs::File> {
    use std::io::Write;
    let dir = Path::new(path)
        .parent()
        .filter(|d| d.is_dir())
        .unwrap_or(Path::new("/tmp"));
    let tmpfile = |d: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(d)
    };
    let mut f = tmpfile(dir)
        .or_else(|_| tmpfile(Path::new("/tmp")))
        .ctx(|| format!("recreate deleted file {path}"))?;
    f.write_all(data)
        .ctx(|| format!("write deleted file {path}"))?;
    Ok(f)
}
