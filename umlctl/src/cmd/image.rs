//! `umlctl image ...`: look inside snapshot images and check them.

use crate::cmd::process::engine_error;
use crate::exit::CliResult;
use crate::output::Output;
use clap::Subcommand;
use engine::image::{FdKind, Vma, VmaKind};
use serde::Serialize;
use std::fmt::Write;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Show an image: processes, threads, mappings with sizes, fds.
    Inspect {
        /// The image directory.
        dir: PathBuf,
    },
    /// Check an image in full (manifest and every page checksum, and those
    /// of the images it builds on); resumes nothing.
    Verify {
        /// The image directory.
        dir: PathBuf,
    },
    /// Merge an incremental image and the images it builds on into one
    /// standalone image.
    Flatten {
        /// The (incremental) image directory.
        dir: PathBuf,
        /// The new image directory.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(out: Output, cmd: ImageCmd) -> CliResult {
    match cmd {
        ImageCmd::Inspect { dir } => inspect(out, dir),
        ImageCmd::Verify { dir } => verify(out, dir),
        ImageCmd::Flatten { dir, out: to } => {
            let made = engine::image::flatten(&dir, &to).map_err(engine_error)?;
            out.emit(&serde_json::json!({ "dir": made }), || {
                format!("{}: a standalone image", made.display())
            });
            Ok(())
        }
    }
}

#[derive(Serialize)]
struct VerifyJson {
    dir: PathBuf,
    ok: bool,
    processes: usize,
    pages_bytes: u64,
}

fn verify(out: Output, dir: PathBuf) -> CliResult {
    let img = engine::Image::open_verified(&dir).map_err(engine_error)?;
    for a in img.ancestors().map_err(engine_error)? {
        a.verify_pages().map_err(engine_error)?;
    }
    let j = VerifyJson {
        dir: dir.clone(),
        ok: true,
        processes: img.manifest.processes.len(),
        pages_bytes: img.manifest.pages.len,
    };
    out.emit(&j, || {
        format!(
            "{}: ok ({} bytes of pages checked)",
            dir.display(),
            j.pages_bytes
        )
    });
    Ok(())
}

#[derive(Serialize)]
struct MappingJson {
    start: String,
    end: String,
    perms: String,
    kind: String,
    size: u64,
    stored: u64,
    /// Bytes taken from parent images (incremental snapshots).
    inherited: u64,
}

#[derive(Serialize)]
struct FdJson {
    fd: i32,
    kind: String,
    target: String,
}

#[derive(Serialize)]
struct ProcessJson {
    pid: i32,
    comm: String,
    exe: String,
    uid: u32,
    gid: u32,
    threads: Vec<i32>,
    mappings: Vec<MappingJson>,
    fds: Vec<FdJson>,
    memory_stored: u64,
}

#[derive(Serialize)]
struct InspectJson {
    dir: PathBuf,
    format_version: u32,
    tool_version: String,
    created_unix_ms: u64,
    kernel: String,
    pages_bytes: u64,
    /// The image an incremental image builds on.
    parent: Option<PathBuf>,
    processes: Vec<ProcessJson>,
}

fn perms(v: &Vma) -> String {
    let f = |b: bool, c: char| if b { c } else { '-' };
    format!(
        "{}{}{}{}",
        f(v.read, 'r'),
        f(v.write, 'w'),
        f(v.exec, 'x'),
        if v.shared { 's' } else { 'p' }
    )
}

fn vma_kind(k: &VmaKind) -> String {
    match k {
        VmaKind::Anon { name } if name.is_empty() => "anon".into(),
        VmaKind::Anon { name } => format!("anon {name}"),
        VmaKind::File { path, .. } => format!("file {path}"),
        VmaKind::Shmem { name, .. } => format!("shmem {name}"),
        VmaKind::Vdso => "[vdso]".into(),
        VmaKind::Vvar => "[vvar]".into(),
        VmaKind::VvarVclock => "[vvar_vclock]".into(),
        VmaKind::Vsyscall => "[vsyscall]".into(),
    }
}

fn fd_json(f: &engine::image::Fd) -> FdJson {
    let (kind, target) = match &f.kind {
        FdKind::File { path, pos, .. } => ("file", format!("{path} @{pos}")),
        FdKind::DeletedFile { path, len, .. } => {
            ("deleted-file", format!("{path} ({len} bytes saved)"))
        }
        FdKind::CharDev { path, .. } => ("chardev", path.clone()),
        FdKind::Stdio { was, .. } => ("stdio", was.clone()),
        FdKind::Object { id } => ("object", format!("#{id}")),
    };
    FdJson {
        fd: f.fd,
        kind: kind.into(),
        target,
    }
}

fn inspect(out: Output, dir: PathBuf) -> CliResult {
    let img = engine::Image::open(&dir).map_err(engine_error)?;
    let m = &img.manifest;
    let processes = m
        .processes
        .iter()
        .map(|p| ProcessJson {
            pid: p.pid,
            comm: p.comm.clone(),
            exe: p.exe.clone(),
            uid: p.creds.uids[0],
            gid: p.creds.gids[0],
            threads: p.threads.iter().map(|t| t.tid).collect(),
            mappings: p
                .vmas
                .iter()
                .map(|v| MappingJson {
                    start: format!("{:#x}", v.start),
                    end: format!("{:#x}", v.end),
                    perms: perms(v),
                    kind: vma_kind(&v.kind),
                    size: v.len(),
                    stored: v.stored_bytes(),
                    inherited: v.inherited.iter().map(|r| r[1] * 4096).sum(),
                })
                .collect(),
            fds: p.fds.iter().map(fd_json).collect(),
            memory_stored: p.vmas.iter().map(|v| v.stored_bytes()).sum(),
        })
        .collect();
    let j = InspectJson {
        dir,
        format_version: engine::image::FORMAT_VERSION,
        tool_version: m.tool_version.clone(),
        created_unix_ms: m.created_unix_ms,
        kernel: m.kernel.clone(),
        pages_bytes: m.pages.len,
        parent: m.parent.as_ref().map(|p| p.dir.clone()),
        processes,
    };
    out.emit(&j, || human_inspect(&j));
    Ok(())
}

fn human_inspect(j: &InspectJson) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "image {} (format {}, umlctl {}, kernel {}), {} bytes of pages",
        j.dir.display(),
        j.format_version,
        j.tool_version,
        j.kernel,
        j.pages_bytes
    );
    if let Some(p) = &j.parent {
        let _ = writeln!(s, "incremental: builds on {}", p.display());
    }
    for p in &j.processes {
        let _ = writeln!(
            s,
            "process {} ({}) exe {} uid {} gid {}, {} thread(s) {:?}, {} KiB of memory stored",
            p.pid,
            p.comm,
            p.exe,
            p.uid,
            p.gid,
            p.threads.len(),
            p.threads,
            p.memory_stored >> 10
        );
        let _ = writeln!(
            s,
            "  {:>14} {:>14} {:4} {:>10} {:>10}  kind",
            "start", "end", "perm", "size KiB", "saved KiB"
        );
        for m in &p.mappings {
            let _ = writeln!(
                s,
                "  {:>14} {:>14} {:4} {:>10} {:>10}  {}",
                m.start,
                m.end,
                m.perms,
                m.size >> 10,
                m.stored >> 10,
                m.kind
            );
        }
        for f in &p.fds {
            let _ = writeln!(s, "  fd {:>3} {:<12} {}", f.fd, f.kind, f.target);
        }
    }
    s.trim_end().to_string()
}
