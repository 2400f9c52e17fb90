//! Process trees: freezing a process and all its descendants in one instant,
//! and rebuilding parents, children, sessions and process groups at resume.
//!
//! Freezing goes top down: a frozen process cannot fork, so once a process
//! is stopped its list of children is final, and each child is frozen
//! before its own children are listed.
//!
//! At resume every puppet is a real child of its parent's puppet: the
//! parent puppet is made to fork (an injected clone3, with the original pid
//! when asked) before either is sculpted. Sessions and groups are then set
//! with injected setsid/setpgid, mapping the image's pids to the new ones;
//! a session or group led by a process outside the tree becomes the root's.

use crate::error::{Error, Result};
use crate::image::Process;
use crate::inject::Remote;
use crate::mem::ProcMem;
use crate::proc;
use crate::ptrace::{self, Frozen};
use crate::puppet::Puppet;
use crate::sys;
use nix::sys::ptrace::Options;
use std::collections::HashMap;

/// Freezes `root` and, with `tree`, all its descendants: root first, then
/// parents before their children.
pub fn freeze(root: i32, tree: bool, opts: Options) -> Result<Vec<Frozen>> {
    let mut out = vec![freeze_one(root, opts)?];
    let mut i = 0;
    while tree && i < out.len() {
        let pid = out[i].pid;
        for child in children(pid)? {
            crate::dump::check_target(child).map_err(|e| Error::Unsupported {
                pid: child,
                what: format!("is a child of {pid} that cannot be snapshotted with it: {e}"),
            })?;
            out.push(freeze_one(child, opts)?);
        }
        i += 1;
    }
    Ok(out)
}

/// Freezes one process; one under seccomp filters with them suspended, so
/// that the dump's injected queries are not filtered.
fn freeze_one(pid: i32, opts: Options) -> Result<Frozen> {
    let opts = if crate::seccomp::confined(pid)? {
        crate::seccomp::suspending(opts)
    } else {
        opts
    };
    Frozen::freeze(pid, opts)
}

/// Children of every thread of `pid`.
fn children(pid: i32) -> Result<Vec<i32>> {
    let mut out = Vec::new();
    for tid in proc::threads(pid)? {
        let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children"))
            .map_err(|e| Error::io(format!("list the children of {pid}"), e))?;
        out.extend(
            text.split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok()),
        );
    }
    out.sort();
    Ok(out)
}

/// Parent, process group and session from /proc/PID/stat.
pub fn ids(pid: i32) -> Result<(i32, i32, i32)> {
    let f = proc::stat_fields(pid)?;
    let n = |i| proc::stat_field(&f, i) as i32;
    Ok((n(4), n(5), n(6)))
}

/// Forks a child puppet from `parent` (not yet sculpted), with pid `want`
/// when given. The child is stopped and traced like its parent.
pub fn fork_puppet(parent: &mut Puppet, want: Option<i32>) -> Result<Puppet> {
    let page = parent.sys(
        "mmap a page for clone3",
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
    let tid = want.unwrap_or(0);
    parent.mem.write(page + 512, &tid.to_ne_bytes())?;
    let args = sys::CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if want.is_some() { page + 512 } else { 0 },
        set_tid_size: want.is_some() as u64,
        ..Default::default()
    };
    parent.mem.write(page, sys::as_bytes(&args))?;
    let r = parent.main.call(
        libc::SYS_clone3,
        &[page, std::mem::size_of::<sys::CloneArgs>() as u64],
    )?;
    // The event names the child as our namespace sees it (r is the pid
    // inside the parent's namespace).
    let seen = parent.main.last_clone;
    parent.sys("munmap the clone3 page", libc::SYS_munmap, &[page, 4096])?;
    if r == -(libc::EEXIST as i64) {
        return Err(Error::PidInUse(tid));
    }
    if r < 0 {
        return Err(Error::sys(
            "clone3 a child process",
            nix::errno::Errno::from_raw(-r as i32),
        ));
    }
    let pid = seen.unwrap_or(r as i32);
    if !ptrace::wait_frozen(pid)? {
        return Err(Error::Restore(format!("new child process {pid} died")));
    }
    let regs = ptrace::getregs(pid)?;
    Ok(Puppet::adopt(
        pid,
        ProcMem::open(pid)?,
        Remote::new(pid, parent.main.ip, regs),
    ))
}

/// Makes one puppet per process of the image, each the child of its
/// parent's puppet. `root` is the already spawned root puppet.
pub fn spawn_children(
    root: Puppet,
    processes: &[Process],
    same_pid: bool,
    made: &mut Vec<i32>,
) -> Result<Vec<Puppet>> {
    // The puppet calls setsid() itself, but may have been seized before it
    // got there; its children must be born in its session.
    let mut root = root;
    if root.main.call(libc::SYS_setsid, &[])? < 0 {
        tracing::debug!("root puppet {} is already a session leader", root.pid);
    }
    let mut puppets = vec![root];
    for p in &processes[1..] {
        let parent = processes
            .iter()
            .position(|q| q.pid == p.ppid)
            .ok_or_else(|| {
                Error::Restore(format!("process {} has no parent in the image", p.pid))
            })?;
        let mut child = fork_puppet(&mut puppets[parent], same_pid.then_some(p.pid))?;
        made.push(child.pid);
        if p.sid == p.pid {
            // Before it forks its own children, which belong to its session.
            child.sys("setsid", libc::SYS_setsid, &[])?;
        }
        puppets.push(child);
    }
    Ok(puppets)
}

/// Sets process groups as the image had them, relative to the tree (the
/// sessions were made at fork): group leaders first, then the members.
pub fn set_groups(puppets: &mut [Puppet], processes: &[Process]) -> Result<()> {
    // setpgid takes pids as the caller's namespace numbers them.
    let mut new: HashMap<i32, i32> = HashMap::new();
    for (p, q) in processes.iter().zip(puppets.iter()) {
        new.insert(p.pid, inner_pid(q.pid)?);
    }
    for (i, p) in processes.iter().enumerate() {
        if p.pgid == p.pid && p.sid != p.pid {
            puppets[i].sys("setpgid(0, 0)", libc::SYS_setpgid, &[0, 0])?;
        }
    }
    for (i, p) in processes.iter().enumerate() {
        if p.pgid != p.pid {
            if let Some(&g) = new.get(&p.pgid) {
                puppets[i].sys(
                    &format!("setpgid(0, {g})"),
                    libc::SYS_setpgid,
                    &[0, g as u64],
                )?;
            }
        }
    }
    Ok(())
}

/// `pid` as its own PID namespace numbers it (NSpid's last field).
fn inner_pid(pid: i32) -> Result<i32> {
    let st = proc::status(pid)?;
    Ok(proc::status_nums(&st, "NSpid")
        .last()
        .map_or(pid, |&p| p as i32))
}
