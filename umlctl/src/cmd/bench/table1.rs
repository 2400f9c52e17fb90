//! `umlctl bench table1`: the paper's Table 1 for this engine.
//!
//! For each size a test workload (tools/src/bin/workload.rs) holds that many
//! MiB; it is snapshotted (stop-and-copy, left running) and the image is
//! resumed (eager), `--runs` times. Beside each figure stands the raw limit
//! measured in the same run on the same bytes: reading them with
//! process_vm_readv and writing them to a file with fsync (snapshot), and
//! copying them from the page-cached file into fresh memory (resume). The
//! paper's own figures (766 MHz Pentium III) are printed for reference.

use crate::cmd::process::engine_error;
use crate::exit::{CliError, CliResult, Code};
use crate::output::Output;
use serde::Serialize;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Table1Args {
    /// Process sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128,512,1024")]
    pub sizes: Vec<u64>,
    /// Runs per size (medians are reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Where images are written (default: a new directory under /var/tmp).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The paper's Table 1 snapshot times in seconds, by MiB.
const PAPER: &[(u64, f64)] = &[(32, 0.89), (64, 1.78), (128, 10.42)];

#[derive(Serialize, Debug)]
struct Row {
    size_mib: u64,
    snapshot_ms: f64,
    stopped_ms: f64,
    resume_ms: f64,
    image_mib: f64,
    raw_copy_ms: f64,
    snapshot_vs_raw: f64,
    raw_fill_ms: f64,
    resume_vs_raw: f64,
    paper_snapshot_s: Option<f64>,
}

pub fn run(out: Output, a: Table1Args) -> CliResult {
    let base = match &a.dir {
        Some(d) => d.clone(),
        None => PathBuf::from(format!("/var/tmp/umlctl-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&base)?;
    let result = a
        .sizes
        .iter()
        .map(|&mib| measure(&base, mib, a.runs.max(1), &out))
        .collect::<CliResult<Vec<Row>>>();
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
    let rows = result?;
    out.emit(&serde_json::json!({ "runs": a.runs, "rows": rows }), || {
        table(&rows, a.runs)
    });
    Ok(())
}

fn workload_binary() -> CliResult<PathBuf> {
    let exe = std::env::current_exe()?;
    let w = exe.with_file_name("workload");
    if !w.exists() {
        return Err(CliError::new(
            Code::Environment,
            format!(
                "{} not found: build it with `cargo build --release -p umlctl-tools`",
                w.display()
            ),
        ));
    }
    Ok(w)
}

/// Starts a workload of `mib` MiB and waits until its memory is filled.
fn start_workload(mib: u64) -> CliResult<Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(workload_binary()?);
    cmd.args(["--mib", &mib.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: close_range is async-signal-safe; the workload must hold no
    // descriptor the engine cannot save (ours may be pipes).
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0);
            Ok(())
        })
    };
    let mut child = cmd.spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    if !line.starts_with("ready") {
        return Err(CliError::new(
            Code::Internal,
            format!("workload did not start: {line}"),
        ));
    }
    Ok(child)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn measure(base: &Path, mib: u64, runs: usize, out: &Output) -> CliResult<Row> {
    let mut child = start_workload(mib)?;
    let pid = child.id() as i32;
    let bar = out.bytes_bar(runs as u64, &format!("{mib} MiB"));
    let mut s = Samples::default();
    let mut image = 0.0;
    for i in 0..runs {
        let dir = base.join(format!("img-{mib}-{i}"));
        let d = engine::dump(pid, &dir, &engine::DumpOptions::default()).map_err(engine_error)?;
        let opts = engine::ResumeOptions {
            stdio: engine::Stdio::Null,
            ..Default::default()
        };
        let r = engine::resume(&dir, &opts).map_err(engine_error)?;
        // SAFETY: killing the copy we just made.
        unsafe { libc::kill(r.pid, libc::SIGKILL) };
        let (raw_copy, raw_fill) = raw_limits(pid, &dir, base)?;
        s.0.push(ms(d.total));
        s.1.push(ms(d.frozen));
        s.2.push(ms(r.elapsed));
        s.3.push(ms(raw_copy));
        s.4.push(ms(raw_fill));
        image = d.image_bytes as f64 / (1 << 20) as f64;
        std::fs::remove_dir_all(&dir)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let _ = child.kill();
    let _ = child.wait();
    let (snap, stopped, resume, raw_copy, raw_fill) = (
        median(s.0),
        median(s.1),
        median(s.2),
        median(s.3),
        median(s.4),
    );
    Ok(Row {
        size_mib: mib,
        snapshot_ms: snap,
        stopped_ms: stopped,
        resume_ms: resume,
        image_mib: image,
        raw_copy_ms: raw_copy,
        snapshot_vs_raw: snap / raw_copy,
        raw_fill_ms: raw_fill,
        resume_vs_raw: resume / raw_fill,
        paper_snapshot_s: PAPER.iter().find(|p| p.0 == mib).map(|p| p.1),
    })
}

/// The raw limits on the bytes the image holds: process_vm_readv of the
/// same ranges plus write and fsync of a file; and copying that file's
/// bytes into fresh memory.
fn raw_limits(pid: i32, image_dir: &Path, base: &Path) -> CliResult<(Duration, Duration)> {
    let img = engine::Image::open(image_dir).map_err(engine_error)?;
    let runs: Vec<(u64, usize)> = img.manifest.processes[0]
        .vmas
        .iter()
        .filter(|v| matches!(v.kind, engine::image::VmaKind::Anon { .. }))
        .flat_map(|v| v.pages.iter().map(|r| (r[0], (r[1] * 4096) as usize)))
        .collect();
    let path = base.join("raw.bin");
    let t = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    let mut buf = vec![0u8; 8 << 20];
    for (addr, len) in runs {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len());
            engine::mem::vm_read(pid, &[(addr + done as u64, n)], &mut buf[..n])
                .map_err(engine_error)?;
            f.write_all(&buf[..n])?;
            done += n;
        }
    }
    f.sync_all()?;
    let copy = t.elapsed();
    drop(f);
    let t = Instant::now();
    let mut file = std::fs::File::open(&path)?;
    // Fresh (untouched) memory, filled from the page cache by one copy.
    let mut fresh = vec![0u8; file.metadata()?.len() as usize];
    std::io::Read::read_exact(&mut file, &mut fresh)?;
    std::hint::black_box(&fresh);
    let fill = t.elapsed();
    std::fs::remove_file(&path)?;
    Ok((copy, fill))
}

fn table(rows: &[Row], runs: usize) -> String {
    let mut s = format!(
        "Table 1: stop-and-copy snapshot and eager resume, medians of {runs} runs\n\
         raw copy = process_vm_readv + write + fsync of the same bytes; raw fill = the same bytes from the file into fresh memory\n\n\
         | size MiB | snapshot ms | stopped ms | raw copy ms | snapshot/raw | resume ms | raw fill ms | resume/raw | image MiB | paper snapshot s |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        s += &format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.1} | {:.2}x | {:.1} | {} |\n",
            r.size_mib,
            r.snapshot_ms,
            r.stopped_ms,
            r.raw_copy_ms,
            r.snapshot_vs_raw,
            r.resume_ms,
            r.raw_fill_ms,
            r.resume_vs_raw,
            r.image_mib,
            r.paper_snapshot_s.map_or("-".into(), |p| format!("{p:.2}")),
        );
    }
    s += "\npaper: 766 MHz Pentium III, resume < 0.01 s at every size";
    s
}

/// Per-run figures of one size, in milliseconds.
#[derive(Default)]
struct Samples(Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);
