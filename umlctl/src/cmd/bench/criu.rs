//! CRIU beside our engine in `umlctl bench table1`: the same workload
//! binary and sizes, in the same run, with our figures divided by CRIU's.
//!
//! CRIU restores a process under its old PID, so every run gets a workload
//! of its own: start it; `criu dump --leave-running` (wall time, and CRIU's
//! own frozen time from `--display-stats`); fsync of the images (CRIU does
//! not sync them, our snapshot's time includes that); kill it; `criu
//! restore -d` (wall time until the process runs); kill that; `criu
//! lazy-pages` and `criu restore --lazy-pages -d` (wall time), then the
//! restored process reads one word of every page, as ours does after a
//! lazy resume: pages not yet prefetched come through CRIU's pager.
//!
//! The workload's stdout is a file, not a pipe to us: the restored process
//! reports its touch time there (CRIU reopens a file by path; a pipe's
//! reader would be gone). `restore -d` leaves the restored process to
//! whoever reaps orphans; the bench is their subreaper meanwhile, so it
//! reaps them at once and the PID is free for the next restore.
//!
//! CRIU is never required: when it is missing, fails `criu check`, or fails
//! during the runs, the report says so and why, and has no figures.

use super::table1::{workload_binary, Samples};
use super::ChartLine;
use crate::output::Output;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct CriuArgs {
    /// The CRIU to compare with (default: $UMLCTL_CRIU_DIR/criu as installed
    /// by tools/install-criu, else `criu` on PATH); used only if
    /// `criu check` passes.
    #[arg(long, value_name = "PATH")]
    pub criu: Option<PathBuf>,
    /// Do not run CRIU.
    #[arg(long, conflicts_with = "criu")]
    pub no_criu: bool,
}

/// Our figures for one size that CRIU's are compared with, in ms.
pub struct Ours {
    pub size_mib: u64,
    pub snapshot_ms: f64,
    pub stopped_ms: f64,
    pub lazy_stopped_ms: f64,
    pub resume_ms: f64,
    pub lazy_resume_ms: f64,
    pub touch_after_lazy_ms: f64,
}

/// CRIU's medians for one size (ms) and the ratios ours / CRIU's.
#[derive(Serialize, Debug)]
pub struct Row {
    size_mib: u64,
    dump_ms: f64,
    /// The dump, then fsync of every file it wrote.
    dump_fsync_ms: f64,
    frozen_ms: f64,
    memory_dump_ms: f64,
    memory_write_ms: f64,
    restore_ms: f64,
    /// CRIU's own "Restore time" statistic (excludes its start-up).
    restore_stat_ms: f64,
    lazy_restore_ms: Option<f64>,
    touch_after_lazy_ms: Option<f64>,
    snapshot_vs_dump_fsync: f64,
    stopped_vs_frozen: f64,
    lazy_stopped_vs_frozen: f64,
    resume_vs_restore: f64,
    lazy_resume_vs_lazy_restore: Option<f64>,
    touch_vs_criu_touch: Option<f64>,
}

#[derive(Serialize, Debug)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Report {
    NotAvailable {
        reason: String,
    },
    Failed {
        version: String,
        reason: String,
    },
    Measured {
        version: String,
        binary: PathBuf,
        /// Wall time of `criu check --feature timerfd`: the kernel probing
        /// every criu command does first, included in the wall times.
        startup_ms: f64,
        /// Whether /run is a tmpfs (else criu keeps no cache of that probe).
        kdat_cached: bool,
        /// Why the lazy figures are missing, when they are.
        lazy_unavailable: Option<String>,
        rows: Vec<Row>,
    },
}

/// Runs CRIU beside `ours` as the arguments ask, or says why it did not.
pub fn compare(a: &CriuArgs, base: &Path, ours: &[Ours], runs: usize, out: &Output) -> Report {
    match Criu::find(a) {
        Ok(criu) => criu.measure(base, ours, runs, out),
        Err(reason) => Report::NotAvailable { reason },
    }
}

/// A CRIU that passed `criu check`.
pub struct Criu {
    bin: PathBuf,
    version: String,
}

impl Criu {
    /// The CRIU the arguments ask for, or why there is none to use.
    pub fn find(a: &CriuArgs) -> Result<Criu, String> {
        if a.no_criu {
            return Err("--no-criu".into());
        }
        let explicit = a.criu.is_some();
        let bin = a.criu.clone().unwrap_or_else(default_binary);
        let out = match Command::new(&bin).arg("--version").output() {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Err("no criu installed (tools/install-criu installs one)".into())
            }
            Err(e) => return Err(format!("{}: {e}", bin.display())),
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("Version:")
            .trim()
            .to_string();
        let check = Command::new(&bin)
            .arg("check")
            .output()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        if !check.status.success() {
            return Err(format!(
                "{} check fails: {}",
                bin.display(),
                last_line(&String::from_utf8_lossy(&check.stderr))
            ));
        }
        Ok(Criu { bin, version })
    }

    /// Measures every size of `ours` with `runs` runs each; images go
    /// under `base`.
    pub fn measure(&self, base: &Path, ours: &[Ours], runs: usize, out: &Output) -> Report {
        let _reaper = Subreaper::become_one();
        let startup = match self.startup_time() {
            Ok(d) => d,
            Err(reason) => return self.failed(reason),
        };
        let mut lazy = Ok(());
        let mut rows = Vec::new();
        for o in ours {
            let bar = out.bytes_bar(runs as u64, &format!("CRIU {} MiB", o.size_mib));
            let mut s = Samples::default();
            for i in 0..runs {
                let dir = base.join(format!("criu-{}-{i}", o.size_mib));
                let result = self.one_run(&dir, o.size_mib, &mut lazy, &mut s);
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::fs::remove_file(dir.with_extension("out"));
                if let Err(reason) = result {
                    return self.failed(format!("{} MiB: {reason}", o.size_mib));
                }
                bar.inc(1);
            }
            bar.finish_and_clear();
            rows.push(row(o, &s, lazy.is_ok()));
        }
        Report::Measured {
            version: self.version.clone(),
            binary: self.bin.clone(),
            startup_ms: ms(startup),
            kdat_cached: nix::sys::statfs::statfs("/run")
                .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC),
            lazy_unavailable: lazy.err(),
            rows,
        }
    }

    fn failed(&self, reason: String) -> Report {
        Report::Failed {
            version: self.version.clone(),
            reason,
        }
    }

    /// Median wall time of a criu command that does nothing but start.
    fn startup_time(&self) -> Result<Duration, String> {
        let mut times: Vec<Duration> = (0..3)
            .map(|_| {
                self.run(&["check", "--feature", "timerfd"], None)
                    .map(|r| r.0)
            })
            .collect::<Result<_, _>>()?;
        times.sort();
        Ok(times[1])
    }

    /// Dump, restore, and (while `lazy` is Ok) lazy restore of a new
    /// workload; a lazy failure is kept in `lazy` and not retried.
    fn one_run(
        &self,
        dir: &Path,
        mib: u64,
        lazy: &mut Result<(), String>,
        s: &mut Samples,
    ) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let report = dir.with_extension("out");
        let mut workload = start_workload(mib, &report)?;
        let pid = workload.id() as i32;
        let d = dir.display().to_string();
        let dumped = self.run(
            &[
                "dump",
                "-t",
                &pid.to_string(),
                "-D",
                &d,
                "--leave-running",
                "--display-stats",
                "-o",
                "dump.log",
            ],
            Some(&dir.join("dump.log")),
        );
        let _ = workload.kill();
        let _ = workload.wait();
        let (took, stats) = dumped?;
        s.add("dump", took);
        s.add("dump_fsync", took + fsync_all(dir)?);
        s.add("frozen", stat(&stats, "Frozen time")?);
        s.add("memory_dump", stat(&stats, "Memory dump time")?);
        s.add("memory_write", stat(&stats, "Memory write time")?);

        let restored = self.run(
            &[
                "restore",
                "-D",
                &d,
                "-d",
                "--display-stats",
                "-o",
                "restore.log",
            ],
            Some(&dir.join("restore.log")),
        );
        let running = restored.and_then(|r| is_running(pid).map(|()| r));
        kill_and_reap(pid);
        let (took, stats) = running?;
        s.add("restore", took);
        s.add("restore_stat", stat(&stats, "Restore time")?);

        if lazy.is_ok() {
            match self.lazy_run(dir, pid, &report) {
                Ok((restore, touch)) => {
                    s.add("lazy_restore", restore);
                    s.add("touch", touch);
                }
                Err(reason) => *lazy = Err(reason),
            }
        }
        Ok(())
    }

    /// `criu lazy-pages` serving `criu restore --lazy-pages -d`: the time
    /// to a running process, then the time it takes to read every page.
    fn lazy_run(
        &self,
        dir: &Path,
        pid: i32,
        report: &Path,
    ) -> Result<(Duration, Duration), String> {
        let d = dir.display().to_string();
        let mut pager = Command::new(&self.bin)
            .args(["lazy-pages", "-D", &d, "-o", "lazy-pages.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("criu lazy-pages: {e}"))?;
        let result = self.lazy_restore_and_touch(dir, &mut pager, pid, report);
        // Once its process is gone the pager has nothing left to serve.
        let t0 = Instant::now();
        while matches!(pager.try_wait(), Ok(None)) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = pager.kill();
        let _ = pager.wait();
        result
    }

    fn lazy_restore_and_touch(
        &self,
        dir: &Path,
        pager: &mut Child,
        pid: i32,
        report: &Path,
    ) -> Result<(Duration, Duration), String> {
        // The restore connects to the pager's socket: wait for it.
        let socket = dir.join("lazy-pages.socket");
        let t0 = Instant::now();
        while !socket.exists() {
            if !matches!(pager.try_wait(), Ok(None)) || t0.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "criu lazy-pages did not start: {}",
                    log_reason(&dir.join("lazy-pages.log"))
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let d = dir.display().to_string();
        let restored = self.run(
            &[
                "restore",
                "-D",
                &d,
                "-d",
                "--lazy-pages",
                "-o",
                "restore-lazy.log",
            ],
            Some(&dir.join("restore-lazy.log")),
        );
        let touched = restored.and_then(|(took, _)| {
            is_running(pid)?;
            // SAFETY: signalling the process criu restored for us.
            unsafe { libc::kill(pid, libc::SIGUSR2) };
            Ok((took, wait_for_touch(report)?))
        });
        kill_and_reap(pid);
        touched
    }

    /// Runs criu, returning its wall time and output, or why it failed:
    /// its last error, from `log` when it logged there.
    fn run(&self, args: &[&str], log: Option<&Path>) -> Result<(Duration, String), String> {
        let t0 = Instant::now();
        let out = Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{}: {e}", self.bin.display()))?;
        let took = t0.elapsed();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let why = log.map_or_else(|| last_line(&text), log_reason);
            return Err(format!("criu {} failed ({}): {why}", args[0], out.status));
        }
        Ok((took, text))
    }
}

fn default_binary() -> PathBuf {
    let dir = std::env::var_os("UMLCTL_CRIU_DIR")
        .map_or_else(|| PathBuf::from("/opt/umlctl/criu"), PathBuf::from);
    let installed = dir.join("criu");
    if installed.exists() {
        installed
    } else {
        PathBuf::from("criu")
    }
}

/// Starts a workload of `mib` MiB as a session leader (CRIU dumps whole
/// sessions) with stdout into `report`; returns once its memory is filled.
fn start_workload(mib: u64, report: &Path) -> Result<Child, String> {
    use std::os::unix::process::CommandExt;
    let stdout = std::fs::File::create(report).map_err(|e| format!("{}: {e}", report.display()))?;
    let bin = workload_binary().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.args(["--mib", &mib.to_string()])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::null());
    // SAFETY: setsid and close_range are async-signal-safe; CRIU must not
    // meet descriptors of ours in the workload.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0);
            Ok(())
        })
    };
    let mut child = cmd.spawn().map_err(|e| format!("workload: {e}"))?;
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(report).unwrap_or_default();
        if text.starts_with("ready") && text.ends_with('\n') {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the workload ended ({status}) before it was ready"));
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the workload was not ready after 60 s: {text}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The time the workload reports for reading every page.
fn wait_for_touch(report: &Path) -> Result<Duration, String> {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(report).unwrap_or_default();
        if let Some(us) = text
            .lines()
            .find_map(|l| l.strip_prefix("touch t=0 us="))
            .and_then(|v| v.trim().parse().ok())
        {
            return Ok(Duration::from_micros(us));
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err("the lazily restored workload did not report".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The time to fsync every file in `dir`, and `dir` itself.
fn fsync_all(dir: &Path) -> Result<Duration, String> {
    let t0 = Instant::now();
    let sync = |p: &Path| std::fs::File::open(p).and_then(|f| f.sync_all());
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries {
        let p = e.map_err(|e| e.to_string())?.path();
        sync(&p).map_err(|e| format!("fsync {}: {e}", p.display()))?;
    }
    sync(dir).map_err(|e| format!("fsync {}: {e}", dir.display()))?;
    Ok(t0.elapsed())
}

/// The state letter and parent of `pid`, from /proc/PID/stat.
fn state_and_parent(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // They follow the command name, which is in parentheses.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// Ok if `pid` is a running child of ours (criu has exited, so what it
/// restored was handed to us as the subreaper).
fn is_running(pid: i32) -> Result<(), String> {
    match state_and_parent(pid) {
        Some((state, parent)) if state != 'Z' && parent == std::process::id() as i32 => Ok(()),
        _ => Err(format!(
            "criu restore returned but process {pid} is not running"
        )),
    }
}

fn kill_and_reap(pid: i32) {
    // Only our own child: after a failed restore the PID may be anyone's.
    if state_and_parent(pid).is_none_or(|(_, parent)| parent != std::process::id() as i32) {
        return;
    }
    // SAFETY: killing and reaping a child of ours.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// Makes this process the reaper of its orphaned descendants until dropped.
struct Subreaper;

impl Subreaper {
    fn become_one() -> Subreaper {
        // SAFETY: plain prctl on ourselves.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        Subreaper
    }
}

impl Drop for Subreaper {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) };
    }
}

/// A time from criu's --display-stats output ("Frozen time: 23761 us").
fn stat(text: &str, name: &str) -> Result<Duration, String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("us")?.trim().parse().ok())
        .map(Duration::from_micros)
        .ok_or_else(|| format!("criu printed no \"{name}\" statistic"))
}

/// The last error criu wrote to its log, else the log's last line.
fn log_reason(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.starts_with("Error"))
        .map_or_else(|| last_line(&text), str::to_string)
}

fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
        .to_string()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn row(o: &Ours, s: &Samples, lazy: bool) -> Row {
    let m = |c: &str| s.median(c);
    let lazy_m = |c: &str| lazy.then(|| s.median(c));
    Row {
        size_mib: o.size_mib,
        dump_ms: m("dump"),
        dump_fsync_ms: m("dump_fsync"),
        frozen_ms: m("frozen"),
        memory_dump_ms: m("memory_dump"),
        memory_write_ms: m("memory_write"),
        restore_ms: m("restore"),
        restore_stat_ms: m("restore_stat"),
        lazy_restore_ms: lazy_m("lazy_restore"),
        touch_after_lazy_ms: lazy_m("touch"),
        snapshot_vs_dump_fsync: o.snapshot_ms / m("dump_fsync"),
        stopped_vs_frozen: o.stopped_ms / m("frozen"),
        lazy_stopped_vs_frozen: o.lazy_stopped_ms / m("frozen"),
        resume_vs_restore: o.resume_ms / m("restore"),
        lazy_resume_vs_lazy_restore: lazy_m("lazy_restore").map(|c| o.lazy_resume_ms / c),
        touch_vs_criu_touch: lazy_m("touch").map(|c| o.touch_after_lazy_ms / c),
    }
}

/// CRIU's lines for the chart (dashed, in the colours of ours they compare
/// with); none without figures.
pub fn series(report: &Report) -> Vec<ChartLine> {
    let Report::Measured { rows, .. } = report else {
        return Vec::new();
    };
    type Figure = (&'static str, &'static str, fn(&Row) -> Option<f64>);
    let figures: [Figure; 4] = [
        ("CRIU dump + fsync", "#1f77b4", |r| Some(r.dump_fsync_ms)),
        ("CRIU frozen", "#aec7e8", |r| Some(r.frozen_ms)),
        ("CRIU restore", "#2ca02c", |r| Some(r.restore_ms)),
        ("CRIU lazy restore", "#ff7f0e", |r| r.lazy_restore_ms),
    ];
    figures
        .iter()
        .map(|&(name, color, f)| ChartLine {
            name,
            color,
            dashed: true,
            ms: rows.iter().map(|r| f(r).unwrap_or(f64::NAN)).collect(),
        })
        .collect()
}

/// The CRIU part of the human report.
pub fn table(report: &Report, runs: usize) -> String {
    let (version, binary, startup_ms, kdat_cached, lazy_unavailable, rows) = match report {
        Report::NotAvailable { reason } => return format!("\nCRIU: not available ({reason})"),
        Report::Failed { version, reason } => {
            return format!("\nCRIU {version}: failed, no figures ({reason})")
        }
        Report::Measured {
            version,
            binary,
            startup_ms,
            kdat_cached,
            lazy_unavailable,
            rows,
        } => (
            version,
            binary,
            startup_ms,
            kdat_cached,
            lazy_unavailable,
            rows,
        ),
    };
    let cache = if *kdat_cached {
        ""
    } else {
        " (no cache of it: /run is not a tmpfs)"
    };
    let mut s = format!(
        "\n\nCRIU {version} ({}) on the same workload, medians of {runs} runs (ms); ratios are ours / CRIU's (below 1: ours is faster)\n\
         dump and restore are wall times of `criu dump --leave-running` and `criu restore -d`; frozen is CRIU's own statistic;\n\
         CRIU does not fsync its images, so our snapshot (which does) is compared with the dump plus an fsync of its files;\n\
         every criu command first probes the kernel, {startup_ms:.1} ms here{cache}, included in its wall time;\n\
         touch: reading every page right after the lazy restore returns (what the pager has not prefetched yet comes through it)\n\n\
         | MiB | CRIU dump | CRIU dump + fsync | snapshot/(dump+fsync) | CRIU frozen | stopped/frozen | lazy stopped/frozen | CRIU restore | resume/restore | CRIU lazy restore | lazy resume/lazy restore | CRIU touch after lazy | touch/CRIU touch |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        binary.display()
    );
    let opt = |v: Option<f64>, unit: &str, digits: usize| {
        v.map_or("-".to_string(), |v| format!("{v:.digits$}{unit}"))
    };
    for r in rows {
        s += &format!(
            "| {} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.2}x | {:.3}x | {:.1} | {:.2}x | {} | {} | {} | {} |\n",
            r.size_mib,
            r.dump_ms,
            r.dump_fsync_ms,
            r.snapshot_vs_dump_fsync,
            r.frozen_ms,
            r.stopped_vs_frozen,
            r.lazy_stopped_vs_frozen,
            r.restore_ms,
            r.resume_vs_restore,
            opt(r.lazy_restore_ms, "", 1),
            opt(r.lazy_resume_vs_lazy_restore, "x", 3),
            opt(r.touch_after_lazy_ms, "", 1),
            opt(r.touch_vs_criu_touch, "x", 2),
        );
    }
    if let Some(why) = lazy_unavailable {
        s += &format!("\nCRIU lazy restore: not measured ({why})");
    }
    s.trim_end().to_string()
}
