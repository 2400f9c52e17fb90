//! Cheap clones: N processes resumed from one image that share, between
//! them, every page none of them has written (one copy in memory, not N).
//!
//! One resume builds a template: a puppet whose memory is mapped and filled
//! from the image, and no more (`restore::build_memory`). Each clone is a
//! fork of the template (an injected clone3 with CLONE_PARENT, so that the
//! clone is the template's sibling, reparented like any resumed process),
//! finished on its own: files, attributes, threads, credentials, registers
//! (`restore::build_rest`). Fork shares every private page copy-on-write;
//! the template is killed once the clones are built, and its pages stay
//! with them.
//!
//! Why fork, and not the image's pages.img mapped into every clone: a
//! private file mapping reads the file again after MADV_DONTNEED, where the
//! anonymous memory a process had must read zeros; forked anonymous memory
//! keeps every semantic of the original. Why a filled template, not a lazy
//! one: a fork does not inherit userfaultfd registrations without
//! UFFD_FEATURE_EVENT_FORK, and with it each child faults separately, so
//! the pages would again be copied once per clone.
//!
//! What a fork would share that clones must not: open file descriptions
//! kept as objects (pipes, sockets, eventfd...) and shared memory. Images
//! holding them are refused, before anything is made: resume those one by
//! one. Files reopened by path are opened by each clone.

use crate::error::{Error, Result};
use crate::files::Stdio;
use crate::image::{Image, Process, VmaKind};
use crate::ptrace;
use crate::puppet::Puppet;
use crate::restore::{self, Context, ResumeOptions, ResumeReport};
use crate::sys;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Default)]
pub struct CloneOptions {
    /// How many clones to make (at least one).
    pub count: usize,
    /// What std streams that were pipes or terminals become, in every clone.
    pub stdio: Stdio,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CloneReport {
    /// One report per clone, in the order they were made.
    pub clones: Vec<ResumeReport>,
    /// Time to build the template (memory mapped and filled).
    pub template: Duration,
    pub elapsed: Duration,
}

/// Makes `opts.count` clones of the single-process image in `dir`; returns
/// once all run. All or nothing: if one cannot be made, none is left.
pub fn clone_image(dir: &Path, opts: &CloneOptions) -> Result<CloneReport> {
    let t0 = Instant::now();
    if opts.count == 0 {
        return Err(Error::Restore(
            "asked for 0 clones: ask for 1 or more".into(),
        ));
    }
    let img = Image::open(dir)?;
    let ancestors = img.ancestors()?;
    img.verify_pages()?;
    for a in &ancestors {
        a.verify_pages()?;
    }
    let process = clonable(dir, &img)?;
    let ropts = ResumeOptions {
        stdio: opts.stdio.clone(),
        ..Default::default()
    };
    restore::precheck(dir, process, &ropts, false)?;
    let ancestor_pages = ancestors
        .iter()
        .map(|a| a.pages())
        .collect::<Result<Vec<_>>>()?;
    let pages = img.pages()?;
    let mut installer = crate::fds::Installer::create(&img.manifest, &pages)?;
    let no_pids = HashMap::new();
    let mut ctx = Context {
        index: 0,
        dir,
        pages: &pages,
        opts: &ropts,
        same_pid: false,
        installer: &mut installer,
        objects: &img.manifest.objects,
        pids: &no_pids,
        ancestors: &ancestor_pages,
    };
    let mut template = Puppet::spawn(None)?;
    let mut made = vec![template.pid];
    let built = (|| {
        restore::build_memory(&mut template, process, &mut ctx)?;
        let template_time = t0.elapsed();
        let mut clones = Vec::new();
        for _ in 0..opts.count {
            let mut c = fork_clone(&mut template)?;
            made.push(c.pid);
            let ctx = Context {
                installer: &mut *ctx.installer,
                ..ctx
            };
            let tids = restore::build_rest(&mut c, process, ctx)?;
            clones.push((c.pid, tids));
        }
        Ok((template_time, clones))
    })();
    // The template's pages live on in the clones.
    kill(template.pid);
    let (template_time, clones) = match built {
        Ok(v) => v,
        Err(e) => {
            made.iter().skip(1).for_each(|&pid| kill(pid));
            return Err(e);
        }
    };
    let mut reports = Vec::new();
    for (pid, tids) in clones {
        restore::start(process, &tids)?;
        reports.push(ResumeReport {
            pid,
            tids,
            pids: vec![pid],
            elapsed: t0.elapsed(),
        });
    }
    Ok(CloneReport {
        clones: reports,
        template: template_time,
        elapsed: t0.elapsed(),
    })
}

/// The image's one process, if fork can share everything it has; else why not.
fn clonable<'a>(dir: &Path, img: &'a Image) -> Result<&'a Process> {
    let m = &img.manifest;
    let refuse = |what: String| Error::Unsupported {
        pid: m.processes[0].pid,
        what: format!("{what}, which clones would share: resume it once per copy instead"),
    };
    if m.processes.len() != 1 {
        return Err(refuse(format!(
            "the image holds a tree of {} processes",
            m.processes.len()
        )));
    }
    let p = &m.processes[0];
    if let Some(o) = m.objects.first() {
        return Err(refuse(format!(
            "the image holds open file descriptions kept as objects (the first: {:?})",
            o.kind
        )));
    }
    let shared = p.vmas.iter().find(|v| {
        matches!(v.kind, VmaKind::Shmem { .. })
            || v.shared && matches!(v.kind, VmaKind::Anon { .. })
    });
    if let Some(v) = shared {
        return Err(refuse(format!(
            "shared memory at {:#x}-{:#x}",
            v.start, v.end
        )));
    }
    if p.threads.is_empty() {
        return Err(Error::bad_image(dir, "its process has no thread"));
    }
    Ok(p)
}

/// Forks the template (an injected clone3) into a new puppet, the template's
/// sibling, stopped and traced, with the same memory and injection area.
fn fork_clone(template: &mut Puppet) -> Result<Puppet> {
    let args = sys::CloneArgs {
        flags: libc::CLONE_PARENT as u64,
        ..Default::default()
    };
    let addr = template.put(0x3000, sys::as_bytes(&args))?;
    let r = template.main.call(
        libc::SYS_clone3,
        &[addr, std::mem::size_of::<sys::CloneArgs>() as u64],
    )?;
    if r < 0 {
        return Err(Error::sys(
            "clone3 a clone from the template",
            nix::errno::Errno::from_raw(-r as i32),
        ));
    }
    let pid = template.main.last_clone.unwrap_or(r as i32);
    if !ptrace::wait_frozen(pid)? {
        return Err(Error::Restore(format!("new clone {pid} died")));
    }
    let mut c = template.forked(pid)?;
    // Its own session, as every resumed process has.
    c.sys("setsid", libc::SYS_setsid, &[])?;
    Ok(c)
}

/// Kills a puppet we trace and reaps its exit as its tracer, so that its
/// parent can reap it at once.
fn kill(pid: i32) {
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let flags = nix::sys::wait::WaitPidFlag::__WALL;
    while let Ok(s) = nix::sys::wait::waitpid(pid, Some(flags)) {
        if matches!(
            s,
            nix::sys::wait::WaitStatus::Exited(..) | nix::sys::wait::WaitStatus::Signaled(..)
        ) {
            break;
        }
    }
}
