//! `umlctl bench table1`: the paper's Table 1 for this engine, and the
//! lazy modes beside their baselines.
//!
//! For each size a test workload (tools/src/bin/workload.rs, one thread)
//! holds that many MiB. Each run takes, on the same running process:
//! - a stop-and-copy snapshot and an eager resume, beside the raw limits
//!   on the same bytes (process_vm_readv + write + fsync; the file's bytes
//!   copied into fresh memory);
//! - a lazy snapshot (time stopped, and until complete on disk), beside
//!   fork() of a process of the same size (the other way to get a
//!   copy-on-write instant);
//! - a lazy resume (time until the process runs), then the time the
//!   resumed process takes to read one word of every page (every page
//!   comes through the pager), beside writing one byte per page of fresh
//!   memory;
//! - a tracked full snapshot, writing until 1% of the memory is written,
//!   an incremental snapshot: its time stopped and its size as a share of
//!   the full image.
//!
//! Medians of `--runs`. The paper's figures (766 MHz Pentium III) are
//! printed for reference; `--svg` writes the figures against size.

use super::{criu, ChartLine};
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
    /// Also write the figures against size as an SVG chart here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Clones to start from one image for the memory-sharing figure (0: skip).
    #[arg(long, default_value_t = 10)]
    pub clones: usize,
    /// Size in MiB of the process the clones are made from.
    #[arg(long, default_value_t = 256)]
    pub clone_mib: u64,
    #[command(flatten)]
    pub criu: criu::CriuArgs,
}

/// The paper's Table 1 snapshot times in seconds, by MiB.
const PAPER: &[(u64, f64)] = &[(32, 0.89), (64, 1.78), (128, 10.42)];

#[derive(Serialize, Debug)]
struct Row {
    size_mib: u64,
    image_mib: f64,
    snapshot_ms: f64,
    stopped_ms: f64,
    raw_copy_ms: f64,
    snapshot_vs_raw: f64,
    resume_ms: f64,
    raw_fill_ms: f64,
    resume_vs_raw: f64,
    lazy_stopped_ms: f64,
    lazy_complete_ms: f64,
    fork_ms: f64,
    lazy_stopped_vs_fork: f64,
    lazy_resume_ms: f64,
    touch_after_lazy_ms: f64,
    touch_fresh_ms: f64,
    touch_vs_fresh: f64,
    incremental_stopped_ms: f64,
    incremental_image_pct: f64,
    paper_snapshot_s: Option<f64>,
}

impl Row {
    /// The figures CRIU's are compared with.
    fn ours(&self) -> criu::Ours {
        criu::Ours {
            size_mib: self.size_mib,
            snapshot_ms: self.snapshot_ms,
            stopped_ms: self.stopped_ms,
            lazy_stopped_ms: self.lazy_stopped_ms,
            resume_ms: self.resume_ms,
            lazy_resume_ms: self.lazy_resume_ms,
            touch_after_lazy_ms: self.touch_after_lazy_ms,
        }
    }
}

/// Per-run figures of one size, in milliseconds, by column.
#[derive(Default)]
pub(super) struct Samples {
    cols: std::collections::BTreeMap<&'static str, Vec<f64>>,
}

impl Samples {
    pub(super) fn add(&mut self, col: &'static str, d: Duration) {
        self.cols
            .entry(col)
            .or_default()
            .push(d.as_secs_f64() * 1e3);
    }
    fn add_raw(&mut self, col: &'static str, v: f64) {
        self.cols.entry(col).or_default().push(v);
    }
    fn median_raw(&self, col: &str) -> f64 {
        self.median(col)
    }
    pub(super) fn median(&self, col: &str) -> f64 {
        let mut v = self.cols.get(col).cloned().unwrap_or_default();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
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
    let clones = match result {
        Ok(_) if a.clones > 0 => super::clones::measure(&base, a.clone_mib, a.clones).map(Some),
        _ => Ok(None),
    };
    let criu = result.as_ref().ok().map(|rows| {
        let ours: Vec<criu::Ours> = rows.iter().map(Row::ours).collect();
        criu::compare(&a.criu, &base, &ours, a.runs.max(1), &out)
    });
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
    let (rows, clones) = (result?, clones?);
    if let Some(svg) = &a.svg {
        let criu_lines = criu.as_ref().map_or(Vec::new(), criu::series);
        std::fs::write(svg, chart(&rows, &criu_lines))?;
    }
    let json = serde_json::json!({ "runs": a.runs, "rows": rows, "clones": clones, "criu": criu });
    out.emit(&json, || {
        table(&rows, a.runs)
            + &clones.as_ref().map_or(String::new(), super::clones::table)
            + &criu
                .as_ref()
                .map_or(String::new(), |c| criu::table(c, a.runs))
    });
    Ok(())
}

pub(super) fn workload_binary() -> CliResult<PathBuf> {
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
    start_workload_with(mib, &[])
}

/// `start_workload` with more workload arguments.
pub(super) fn start_workload_with(mib: u64, extra: &[&str]) -> CliResult<Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(workload_binary()?);
    cmd.args(["--mib", &mib.to_string()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: close_range is async-signal-safe; the workload must hold no
    // descriptor the engine cannot save (ours may be anything).
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

fn measure(base: &Path, mib: u64, runs: usize, out: &Output) -> CliResult<Row> {
    let mut child = start_workload(mib)?;
    let pid = child.id() as i32;
    let bar = out.bytes_bar(runs as u64, &format!("{mib} MiB"));
    let mut s = Samples::default();
    let mut image = 0.0;
    for i in 0..runs {
        image = eager_run(pid, &base.join(format!("img-{mib}-{i}")), base, &mut s)?;
        lazy_run(pid, &base.join(format!("lazy-{mib}-{i}")), &mut s)?;
        incremental_run(pid, &base.join(format!("inc-{mib}-{i}")), &mut s)?;
        s.add("fork", fork_time(mib)?);
        s.add("fresh", touch_fresh(mib));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let _ = child.kill();
    let _ = child.wait();
    let m = |c: &str| s.median(c);
    Ok(Row {
        size_mib: mib,
        image_mib: image,
        snapshot_ms: m("snapshot"),
        stopped_ms: m("stopped"),
        raw_copy_ms: m("raw_copy"),
        snapshot_vs_raw: m("snapshot") / m("raw_copy"),
        resume_ms: m("resume"),
        raw_fill_ms: m("raw_fill"),
        resume_vs_raw: m("resume") / m("raw_fill"),
        lazy_stopped_ms: m("lazy_stopped"),
        lazy_complete_ms: m("lazy_complete"),
        fork_ms: m("fork"),
        lazy_stopped_vs_fork: m("lazy_stopped") / m("fork"),
        lazy_resume_ms: m("lazy_resume"),
        touch_after_lazy_ms: m("touch"),
        touch_fresh_ms: m("fresh"),
        touch_vs_fresh: m("touch") / m("fresh"),
        incremental_stopped_ms: m("inc_stopped"),
        incremental_image_pct: s.median_raw("inc_pct"),
        paper_snapshot_s: PAPER.iter().find(|p| p.0 == mib).map(|p| p.1),
    })
}

/// Stop-and-copy snapshot, eager resume, and the raw limits; returns the
/// image size in MiB.
fn eager_run(pid: i32, dir: &Path, base: &Path, s: &mut Samples) -> CliResult<f64> {
    let d = engine::dump(pid, dir, &engine::DumpOptions::default()).map_err(engine_error)?;
    let opts = engine::ResumeOptions {
        stdio: engine::Stdio::Null,
        ..Default::default()
    };
    let r = engine::resume(dir, &opts).map_err(engine_error)?;
    kill(r.pid);
    let (raw_copy, raw_fill) = raw_limits(pid, dir, base)?;
    s.add("snapshot", d.total);
    s.add("stopped", d.frozen);
    s.add("resume", r.elapsed);
    s.add("raw_copy", raw_copy);
    s.add("raw_fill", raw_fill);
    std::fs::remove_dir_all(dir)?;
    Ok(d.image_bytes as f64 / (1 << 20) as f64)
}

/// Lazy snapshot; lazy resume (pager in a thread of ours); the resumed
/// process reads every page.
fn lazy_run(pid: i32, dir: &Path, s: &mut Samples) -> CliResult {
    let opts = engine::DumpOptions {
        lazy: true,
        ..Default::default()
    };
    let d = engine::dump(pid, dir, &opts).map_err(engine_error)?;
    s.add("lazy_stopped", d.frozen);
    s.add("lazy_complete", d.total);
    let log = dir.with_extension("out");
    let opts = engine::ResumeOptions {
        stdio: engine::Stdio::Path(log.display().to_string()),
        lazy: Some(engine::pager_thread()),
        ..Default::default()
    };
    let r = engine::resume(dir, &opts).map_err(engine_error)?;
    s.add("lazy_resume", r.elapsed);
    // SAFETY: signalling the copy we made.
    unsafe { libc::kill(r.pid, libc::SIGUSR2) };
    let t0 = Instant::now();
    let us = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(v) = text.lines().find_map(|l| l.strip_prefix("touch t=0 us=")) {
            break v.trim().parse::<u64>().unwrap_or(0);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            kill(r.pid);
            return Err(CliError::new(
                Code::Internal,
                "the lazily resumed workload did not report",
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    s.add("touch", Duration::from_micros(us));
    kill(r.pid);
    // Let the pager thread see the exit before the image goes.
    std::thread::sleep(Duration::from_millis(50));
    std::fs::remove_dir_all(dir)?;
    let _ = std::fs::remove_file(&log);
    Ok(())
}

/// A tracked full snapshot, the workload writing until 1% of its memory is
/// written, then an incremental one: time stopped and its size against the
/// full image.
/// The tracking userfaultfd is held by this process for the run.
fn incremental_run(pid: i32, dir: &Path, s: &mut Samples) -> CliResult {
    static HELD: std::sync::Mutex<Vec<std::os::fd::OwnedFd>> = std::sync::Mutex::new(Vec::new());
    let holder: engine::track::TrackerLauncher = std::sync::Arc::new(|fd, _pid| {
        HELD.lock().expect("fd list").push(fd);
        Ok(std::process::id() as i32)
    });
    let full = dir.with_extension("full");
    let opts = engine::DumpOptions {
        tracker: Some(holder.clone()),
        ..Default::default()
    };
    let f = engine::dump(pid, &full, &opts).map_err(engine_error)?;
    // The target's case: 1% of the memory written since the full snapshot.
    let t0 = Instant::now();
    while engine::track::written_bytes(pid).map_err(engine_error)? < f.image_bytes / 100
        && t0.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    let opts = engine::DumpOptions {
        tracker: Some(holder),
        parent: Some(full.clone()),
        ..Default::default()
    };
    let d = engine::dump(pid, dir, &opts).map_err(engine_error)?;
    s.add("inc_stopped", d.frozen);
    s.add_raw(
        "inc_pct",
        100.0 * d.image_bytes as f64 / f.image_bytes.max(1) as f64,
    );
    std::fs::remove_dir_all(dir)?;
    std::fs::remove_dir_all(&full)?;
    // Stop tracking: the next run arms it afresh.
    HELD.lock().expect("fd list").clear();
    engine::track::State::forget(pid, std::process::id() as i32);
    Ok(())
}

/// Kills a copy we resumed and waits until its memory is freed (it is
/// then a zombie, or gone): tearing down GiBs takes a CPU for a while,
/// which the next measurement must not share.
pub(super) fn kill(pid: i32) {
    // SAFETY: killing a process we made.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
        if matches!(state, None | Some('Z') | Some('X')) {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// fork() of a process holding `mib` MiB of touched 4 KiB pages: this one.
fn fork_time(mib: u64) -> CliResult<Duration> {
    let len = (mib << 20) as usize;
    let mut v = vec![0u8; len];
    for page in v.chunks_mut(4096) {
        page[0] = 1;
    }
    let t0 = Instant::now();
    // SAFETY: the child only calls _exit.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: leaving the forked child at once.
        unsafe { libc::_exit(0) };
    }
    let took = t0.elapsed();
    if child < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut st = 0;
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(child, &mut st, 0) };
    std::hint::black_box(&v);
    Ok(took)
}

/// Writing one byte per page of fresh memory.
fn touch_fresh(mib: u64) -> Duration {
    let len = (mib << 20) as usize;
    let mut v: Vec<u8> = Vec::with_capacity(len);
    let p = v.as_mut_ptr();
    let t0 = Instant::now();
    for off in (0..len).step_by(4096) {
        // SAFETY: inside the capacity; written, never read as initialized.
        unsafe { p.add(off).write_volatile(1) };
    }
    t0.elapsed()
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
        "Table 1, medians of {runs} runs (ms unless noted)\n\
         raw copy = process_vm_readv + write + fsync of the same bytes; raw fill = those bytes into fresh memory\n\n\
         | MiB | snapshot | stopped | raw copy | snap/raw | resume | raw fill | resume/raw | image MiB | paper snapshot s |\n\
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
    s += "\nLazy modes: lazy snapshot stopped vs fork() of a process of the same size; lazy resume to running;\n\
          reading every page after a lazy resume vs writing every page of fresh memory\n\n\
          | MiB | lazy stopped | fork() | stopped/fork | lazy complete on disk | lazy resume | touch after lazy | touch fresh | touch/fresh | incremental stopped | incremental image % of full |\n\
          |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in rows {
        s += &format!(
            "| {} | {:.2} | {:.2} | {:.2}x | {:.1} | {:.2} | {:.1} | {:.1} | {:.2}x | {:.2} | {:.2}% |\n",
            r.size_mib,
            r.lazy_stopped_ms,
            r.fork_ms,
            r.lazy_stopped_vs_fork,
            r.lazy_complete_ms,
            r.lazy_resume_ms,
            r.touch_after_lazy_ms,
            r.touch_fresh_ms,
            r.touch_vs_fresh,
            r.incremental_stopped_ms,
            r.incremental_image_pct,
        );
    }
    s += "\npaper: 766 MHz Pentium III, resume < 10 ms at every size";
    s
}

/// A log-log chart of the main figures against size, as SVG (hand-written:
/// a few lines and labels need no plotting crate).
fn chart(rows: &[Row], criu: &[ChartLine]) -> String {
    type Series = (&'static str, &'static str, fn(&Row) -> f64);
    let series: [Series; 6] = [
        ("stop-and-copy snapshot", "#1f77b4", |r| r.snapshot_ms),
        ("stopped (stop-and-copy)", "#aec7e8", |r| r.stopped_ms),
        ("stopped (lazy)", "#d62728", |r| r.lazy_stopped_ms),
        ("fork()", "#7f7f7f", |r| r.fork_ms),
        ("eager resume", "#2ca02c", |r| r.resume_ms),
        ("lazy resume", "#ff7f0e", |r| r.lazy_resume_ms),
    ];
    let (w, h, pad) = (720.0, 440.0, 60.0);
    let xs: Vec<f64> = rows.iter().map(|r| (r.size_mib as f64).log10()).collect();
    let (x0, x1) = (
        xs.iter().cloned().fold(f64::MAX, f64::min),
        xs.iter()
            .cloned()
            .fold(f64::MIN, f64::max)
            .max(x0_plus(&xs)),
    );
    let (y0, y1) = (-1.0f64, 4.0f64); // 0.1 ms .. 10 s
    let px = |x: f64| pad + (x - x0) / (x1 - x0).max(1e-9) * (w - 2.0 * pad);
    let py = |ms: f64| h - pad - (ms.max(0.1).log10() - y0) / (y1 - y0) * (h - 2.0 * pad);
    let mut svg = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n");
    for e in -1..=4 {
        let y = py(10f64.powi(e));
        svg += &format!("<line x1='{pad}' x2='{}' y1='{y}' y2='{y}' stroke='#ddd'/><text x='5' y='{}'>{} ms</text>\n", w - pad, y + 4.0, 10f64.powi(e));
    }
    for (r, x) in rows.iter().zip(&xs) {
        svg += &format!(
            "<text x='{}' y='{}' text-anchor='middle'>{} MiB</text>\n",
            px(*x),
            h - pad + 20.0,
            r.size_mib
        );
    }
    let ours = series.iter().map(|&(name, color, f)| ChartLine {
        name,
        color,
        dashed: false,
        ms: rows.iter().map(f).collect(),
    });
    for (i, line) in ours.chain(criu.iter().cloned()).enumerate() {
        let (name, color) = (line.name, line.color);
        let pts: Vec<String> = (line.ms.iter().zip(&xs))
            .filter(|(ms, _)| ms.is_finite())
            .map(|(ms, x)| format!("{:.1},{:.1}", px(*x), py(*ms)))
            .collect();
        let dash = if line.dashed {
            " stroke-dasharray='6,4'"
        } else {
            ""
        };
        svg += &format!(
            "<polyline fill='none' stroke='{color}' stroke-width='2'{dash} points='{}'/>\n",
            pts.join(" ")
        );
        svg += &format!(
            "<text x='{}' y='{}' fill='{color}'>{name}</text>\n",
            pad + 10.0,
            20.0 + 15.0 * i as f64
        );
    }
    svg += "</svg>\n";
    svg
}

fn x0_plus(xs: &[f64]) -> f64 {
    xs.iter().cloned().fold(f64::MAX, f64::min) + 1.0
}
