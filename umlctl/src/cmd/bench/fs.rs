//! `umlctl bench fs`: cowfs against the native file system, kernel overlayfs
//! and fuse-overlayfs, all measured in the same run on the same base (a
//! 1 GiB image and 10k small files). Each figure is a median of `--runs`;
//! cowfs is printed as a ratio to native beside the target.

use crate::cmd::fs::{transport_name, MountArgs};
use crate::exit::{CliError, CliResult, Code};
use crate::output::Output;
use serde::Serialize;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct FsBenchArgs {
    /// Size of the base image and of the sequential transfers, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Small files created (and base files stat()ed).
    #[arg(long, default_value_t = 10_000)]
    pub files: usize,
    /// Runs per figure (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Measure only the figures whose name contains this text (e.g.
    /// "rollback", "warm"); all of them by default.
    #[arg(long)]
    pub only: Option<String>,
    /// How cowfs is mounted (as `umlctl fs mount`).
    #[command(flatten)]
    pub mount: MountArgs,
    /// Serve cowfs from this process (`Store::mount`, as a program that
    /// embeds the library does) instead of a daemon process (`umlctl fs
    /// mount`).
    #[arg(long)]
    pub in_process: bool,
    /// Work directory (the base is kept there between runs).
    #[arg(long, default_value = "/var/tmp/umlctl-bench-fs")]
    pub dir: PathBuf,
}

/// What `--json` prints: how cowfs was mounted, what a cross-CPU wakeup
/// costs on this host (it moves the metadata figures), and the figures.
#[derive(Serialize)]
struct Report {
    cowfs_mount: MountReport,
    /// Median one-way wakeup of a thread on an idle CPU (`umlctl doctor`,
    /// cpu-wakeup); null with one CPU.
    wakeup_us: Option<f64>,
    figures: Vec<Figure>,
}

#[derive(Serialize)]
struct MountReport {
    /// As asked for: auto, io-uring or dev-fuse.
    transport: String,
    /// What the mount asked the kernel for: io-uring or dev-fuse.
    requests_over: String,
    passthrough: bool,
    /// "daemon" (`umlctl fs mount`) or "in-process" (`Store::mount`).
    served_by: &'static str,
}

impl Report {
    fn new(args: &FsBenchArgs, wakeup_us: Option<f64>, figures: Vec<Figure>) -> Report {
        let opts = args.mount.options();
        Report {
            cowfs_mount: MountReport {
                transport: transport_name(opts.transport),
                requests_over: transport_name(opts.transport.resolved()),
                passthrough: opts.passthrough,
                served_by: if args.in_process {
                    "in-process"
                } else {
                    "daemon"
                },
            },
            wakeup_us,
            figures,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Setup {
    Native,
    Overlay,
    FuseOverlayfs,
    Cowfs,
}

const SETUPS: [Setup; 4] = [
    Setup::Native,
    Setup::Overlay,
    Setup::FuseOverlayfs,
    Setup::Cowfs,
];

/// A writable view of the base, torn down on drop.
struct View {
    dir: PathBuf,
    scratch: PathBuf,
    kernel_mount: Option<PathBuf>,
    cowfs: Option<(cowfs::Store, Served)>,
}

/// Who serves a cowfs view.
enum Served {
    InProcess(cowfs::Mount),
    /// A daemon process on this mountpoint.
    Daemon(PathBuf),
}

impl Drop for View {
    fn drop(&mut self) {
        match self.cowfs.take() {
            // Unmounts and waits until the data is durable.
            Some((_, Served::InProcess(m))) => drop(m),
            Some((_, Served::Daemon(mnt))) => {
                if let Err(e) = cowfs::unmount(&mnt) {
                    tracing::warn!("bench fs: unmount {}: {e}", mnt.display());
                }
            }
            None => {}
        }
        if let Some(m) = &self.kernel_mount {
            let _ = Command::new("umount").arg(m).status();
        }
        let _ = fs::remove_dir_all(&self.scratch);
    }
}

struct Bench {
    args: FsBenchArgs,
    base: PathBuf,
    native: PathBuf,
}

fn err(what: &str, e: impl std::fmt::Display) -> CliError {
    CliError::new(Code::Internal, format!("bench fs: {what}: {e}"))
}

fn run_cmd(cmd: &mut Command) -> CliResult {
    let out = cmd.output().map_err(|e| err("run", e))?;
    if !out.status.success() {
        return Err(CliError::new(
            Code::Environment,
            format!(
                "bench fs: {cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

fn drop_caches() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Fill a file with `mib` MiB of non-zero bytes.
fn fill(path: &Path, mib: u64) -> CliResult<f64> {
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 1) as u8).collect();
    let start = Instant::now();
    let mut f = File::create(path).map_err(|e| err("create", e))?;
    for _ in 0..mib {
        f.write_all(&chunk).map_err(|e| err("write", e))?;
    }
    f.sync_all().map_err(|e| err("fsync", e))?;
    Ok(start.elapsed().as_secs_f64())
}

impl Bench {
    /// The base (and an identical native copy) once per work directory.
    fn prepare(args: FsBenchArgs) -> CliResult<Bench> {
        let (base, native) = (args.dir.join("base"), args.dir.join("native"));
        for root in [&base, &native] {
            let img = root.join("big.img");
            let ready = root.join(".ready");
            let want = format!("{} {}", args.size_mib, args.files);
            if fs::read_to_string(&ready).ok().as_deref() == Some(want.as_str()) {
                continue;
            }
            let _ = fs::remove_dir_all(root);
            fs::create_dir_all(root.join("files")).map_err(|e| err("mkdir", e))?;
            fill(&img, args.size_mib)?;
            for i in 0..args.files {
                let d = root.join(format!("files/{:03}", i % 100));
                fs::create_dir_all(&d).map_err(|e| err("mkdir", e))?;
                fs::write(d.join(format!("f{i}")), b"base file").map_err(|e| err("write", e))?;
            }
            fs::write(&ready, want).map_err(|e| err("write", e))?;
        }
        Ok(Bench { args, base, native })
    }

    fn view(&self, setup: Setup) -> CliResult<View> {
        let scratch = self.args.dir.join(format!("view-{setup:?}"));
        let _ = Command::new("umount").arg(scratch.join("mnt")).output();
        let _ = fs::remove_dir_all(&scratch);
        for d in ["upper", "work", "mnt"] {
            fs::create_dir_all(scratch.join(d)).map_err(|e| err("mkdir", e))?;
        }
        let mnt = scratch.join("mnt");
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.base.display(),
            scratch.join("upper").display(),
            scratch.join("work").display()
        );
        let mut view = View {
            dir: mnt.clone(),
            scratch: scratch.clone(),
            kernel_mount: None,
            cowfs: None,
        };
        match setup {
            Setup::Native => view.dir = self.native.clone(),
            Setup::Overlay => {
                run_cmd(
                    Command::new("mount")
                        .args(["-t", "overlay", "overlay", "-o", &opts])
                        .arg(&mnt),
                )?;
                view.kernel_mount = Some(mnt);
            }
            Setup::FuseOverlayfs => {
                run_cmd(Command::new("fuse-overlayfs").args(["-o", &opts]).arg(&mnt))?;
                view.kernel_mount = Some(mnt);
            }
            Setup::Cowfs => {
                let store = cowfs::Store::create(&scratch.join("store"), &self.base, None)
                    .map_err(|e| err("cowfs create", e))?;
                let opts = self.args.mount.options();
                let served = if self.args.in_process {
                    let m = store
                        .mount(&mnt, &opts)
                        .map_err(|e| err("cowfs mount", e))?;
                    Served::InProcess(m)
                } else {
                    crate::cmd::fs::spawn_daemon(&store, &mnt, &opts)?;
                    Served::Daemon(mnt)
                };
                view.cowfs = Some((store, served));
            }
        }
        Ok(view)
    }

    fn wanted(&self, figure: &str) -> bool {
        self.args
            .only
            .as_ref()
            .is_none_or(|o| figure.contains(o.as_str()))
    }

    /// Median of `runs` measurements, each on a fresh view.
    fn each(&self, setup: Setup, f: &dyn Fn(&View) -> CliResult<f64>) -> CliResult<f64> {
        let mut v = Vec::new();
        for _ in 0..self.args.runs.max(1) {
            let view = self.view(setup)?;
            // Start each measurement with no writeback of earlier steps.
            // SAFETY: sync has no preconditions.
            unsafe { libc::sync() };
            v.push(f(&view)?);
        }
        Ok(median(v))
    }
}

/// One figure: its value per setup, the unit, and the target for cowfs.
#[derive(Serialize, Debug)]
struct Figure {
    name: String,
    unit: &'static str,
    values: Vec<(Setup, Option<f64>)>,
    cowfs_vs_native: Option<f64>,
    target: &'static str,
    met: Option<bool>,
}

fn first_write(v: &View) -> CliResult<f64> {
    let start = Instant::now();
    let f = OpenOptions::new()
        .write(true)
        .open(v.dir.join("big.img"))
        .map_err(|e| err("open", e))?;
    f.write_all_at(&[0x5a; 4096], 300 << 20)
        .map_err(|e| err("write", e))?;
    f.sync_all().map_err(|e| err("fsync", e))?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

fn seq_read(path: &Path, cold: bool) -> CliResult<f64> {
    if cold {
        drop_caches();
    }
    let mut f = File::open(path).map_err(|e| err("open", e))?;
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| err("read", e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64())
}

fn random_writes(v: &View) -> CliResult<f64> {
    let path = v.dir.join("rand.dat");
    fill(&path, 256)?;
    let f = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| err("open", e))?;
    let n = 20_000u64;
    let mut x: u64 = 0x9E3779B97F4A7C15;
    let start = Instant::now();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (256 * 256)) * 4096;
        f.write_all_at(&[x as u8; 4096], off)
            .map_err(|e| err("write", e))?;
    }
    f.sync_all().map_err(|e| err("fsync", e))?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn create_files(v: &View, files: usize) -> CliResult<f64> {
    let dir = v.dir.join("new-files");
    let start = Instant::now();
    for i in 0..files {
        let d = dir.join(format!("{:03}", i % 100));
        if i < 100 {
            fs::create_dir_all(&d).map_err(|e| err("mkdir", e))?;
        }
        fs::write(d.join(format!("f{i}")), b"small").map_err(|e| err("write", e))?;
    }
    sync_fs(&v.dir)?;
    // syncfs makes the native and overlay files durable, but reaches no
    // FUSE daemon: cowfs's files are made durable as `umlctl fs sync` does
    // (fuse-overlayfs has no such command: its figure stays without).
    if let Some((store, _)) = &v.cowfs {
        store.sync().map_err(|e| err("cowfs sync", e))?;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn sync_fs(dir: &Path) -> CliResult {
    let f = File::open(dir).map_err(|e| err("open", e))?;
    nix::unistd::syncfs(&f).map_err(|e| err("syncfs", e))
}

fn stat_cold(v: &View, files: usize) -> CliResult<f64> {
    drop_caches();
    let start = Instant::now();
    for i in 0..files {
        let p = v.dir.join(format!("files/{:03}/f{i}", i % 100));
        fs::symlink_metadata(&p).map_err(|e| err("stat", e))?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Change the whole image and create `files` files in a view.
fn change_lots(v: &View, files: usize, mib: u64) -> CliResult {
    fill(&v.dir.join("big.img"), mib)?;
    create_files(v, files)?;
    Ok(())
}

fn checkpoint_rollback(b: &Bench) -> CliResult<(f64, f64, f64)> {
    let (mut cps, mut rbs, mut overlay_rbs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..b.args.runs.max(1) {
        let v = b.view(Setup::Cowfs)?;
        let (store, _) = v.cowfs.as_ref().expect("cowfs view");
        store
            .checkpoint("start")
            .map_err(|e| err("checkpoint", e))?;
        change_lots(&v, b.args.files, b.args.size_mib)?;
        store.sync().map_err(|e| err("sync", e))?;
        let t = Instant::now();
        store
            .checkpoint("changed")
            .map_err(|e| err("checkpoint", e))?;
        cps.push(t.elapsed().as_secs_f64() * 1e3);
        change_lots(&v, b.args.files, b.args.size_mib)?;
        store.sync().map_err(|e| err("sync", e))?;
        let t = Instant::now();
        store.rollback("start").map_err(|e| err("rollback", e))?;
        rbs.push(t.elapsed().as_secs_f64() * 1e3);
        drop(v);
        // overlayfs "rollback": unmount, delete the upper layer, remount.
        let o = b.view(Setup::Overlay)?;
        change_lots(&o, b.args.files, b.args.size_mib)?;
        let t = Instant::now();
        let mnt = o.kernel_mount.clone().expect("overlay mount");
        run_cmd(Command::new("umount").arg(&mnt))?;
        fs::remove_dir_all(o.scratch.join("upper")).map_err(|e| err("rm", e))?;
        fs::create_dir(o.scratch.join("upper")).map_err(|e| err("mkdir", e))?;
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            b.base.display(),
            o.scratch.join("upper").display(),
            o.scratch.join("work").display()
        );
        run_cmd(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts])
                .arg(&mnt),
        )?;
        overlay_rbs.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((median(cps), median(rbs), median(overlay_rbs)))
}

pub fn run(out: Output, args: FsBenchArgs) -> CliResult {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(CliError::new(
            Code::Environment,
            "bench fs needs root (mounts, drop_caches)",
        ));
    }
    let b = Bench::prepare(args)?;
    let (mib, files) = (b.args.size_mib, b.args.files);
    // What a FUSE round trip pays when its reply wakes the caller on the
    // other CPU (`umlctl doctor`, cpu-wakeup): it moves the metadata figures.
    let wakeup = crate::cmd::doctor::wakeup_us().ok().flatten();
    let have_fuse_overlayfs = Command::new("fuse-overlayfs")
        .arg("--version")
        .output()
        .is_ok();
    let setups: Vec<Setup> = SETUPS
        .into_iter()
        .filter(|s| *s != Setup::FuseOverlayfs || have_fuse_overlayfs)
        .collect();
    let mut figures = Vec::new();
    let mut add = |name: String,
                   unit,
                   target,
                   higher_better: bool,
                   limit: f64,
                   f: &dyn Fn(Setup) -> CliResult<Option<f64>>|
     -> CliResult {
        if !b.wanted(&name) {
            return Ok(());
        }
        let mut values = Vec::new();
        for &s in &setups {
            tracing::info!("bench fs: {name} on {s:?}");
            values.push((s, f(s)?));
        }
        let get = |s| values.iter().find(|(x, _)| *x == s).and_then(|(_, v)| *v);
        let ratio = match (get(Setup::Cowfs), get(Setup::Native)) {
            (Some(c), Some(n)) if n > 0.0 => Some(c / n),
            _ => None,
        };
        let met = match (higher_better, ratio, get(Setup::Cowfs)) {
            (true, Some(r), _) => Some(r >= limit),
            (false, Some(r), _) if unit != "ms" => Some(r <= limit),
            (false, _, Some(c)) => Some(c <= limit),
            _ => None,
        };
        figures.push(Figure {
            name,
            unit,
            values,
            cowfs_vs_native: ratio,
            target,
            met,
        });
        Ok(())
    };
    add(
        format!("first 4 KiB write + fsync into a {mib} MiB base file"),
        "ms",
        "<= 2 ms",
        false,
        2.0,
        &|s| b.each(s, &first_write).map(Some),
    )?;
    add(
        format!("sequential read {mib} MiB, cold"),
        "MiB/s",
        ">= 0.9x native",
        true,
        0.9,
        &|s| {
            b.each(s, &|v| seq_read(&v.dir.join("big.img"), true))
                .map(Some)
        },
    )?;
    add(
        format!("sequential read {mib} MiB, warm"),
        "MiB/s",
        ">= 0.9x native",
        true,
        0.9,
        &|s| {
            b.each(s, &|v| {
                seq_read(&v.dir.join("big.img"), false)?;
                seq_read(&v.dir.join("big.img"), false)
            })
            .map(Some)
        },
    )?;
    add(
        format!("sequential write {mib} MiB + fsync"),
        "MiB/s",
        ">= 0.8x native",
        true,
        0.8,
        &|s| {
            b.each(s, &|v| {
                let p = v.dir.join("seq.dat");
                let t = fill(&p, mib)?;
                let _ = fs::remove_file(&p);
                Ok(mib as f64 / t)
            })
            .map(Some)
        },
    )?;
    add(
        "4 KiB random writes, buffered + fsync".into(),
        "IOPS",
        ">= 0.8x native",
        true,
        0.8,
        &|s| {
            b.each(s, &|v| {
                let r = random_writes(v);
                let _ = fs::remove_file(v.dir.join("rand.dat"));
                r
            })
            .map(Some)
        },
    )?;
    add(
        format!("create {files} small files + sync"),
        "s",
        "<= 3x native",
        false,
        3.0,
        &|s| {
            b.each(s, &|v| {
                let r = create_files(v, files);
                let _ = fs::remove_dir_all(v.dir.join("new-files"));
                r
            })
            .map(Some)
        },
    )?;
    add(
        format!("stat {files} base files, cold"),
        "s",
        "<= 3x native",
        false,
        3.0,
        &|s| b.each(s, &|v| stat_cold(v, files)).map(Some),
    )?;
    if !b.wanted("checkpoint") && !b.wanted("rollback") {
        let report = Report::new(&b.args, wakeup, figures);
        out.emit(&report, || table(&report, &setups));
        return Ok(());
    }
    let (cp, rb, orb) = checkpoint_rollback(&b)?;
    let only = |s: Setup, v: f64| (s, Some(v));
    figures.push(Figure {
        name: format!("checkpoint with {mib} MiB + {files} files changed"),
        unit: "ms",
        values: vec![only(Setup::Cowfs, cp)],
        cowfs_vs_native: None,
        target: "<= 1 ms",
        met: Some(cp <= 1.0),
    });
    figures.push(Figure {
        name: format!("rollback with {mib} MiB + {files} files changed"),
        unit: "ms",
        values: vec![only(Setup::Overlay, orb), only(Setup::Cowfs, rb)],
        cowfs_vs_native: None,
        target: "<= 5 ms",
        met: Some(rb <= 5.0),
    });
    let report = Report::new(&b.args, wakeup, figures);
    out.emit(&report, || table(&report, &setups));
    Ok(())
}

fn table(report: &Report, setups: &[Setup]) -> String {
    let m = &report.cowfs_mount;
    let caching = if m.passthrough {
        "passthrough"
    } else {
        "writeback cache"
    };
    let mut s = format!(
        "cowfs ({}): requests over {} (transport {}), {caching}",
        m.served_by, m.requests_over, m.transport
    );
    if let Some(us) = report.wakeup_us {
        s += &format!("; waking a thread on an idle CPU takes {us:.1} us");
    }
    s += "\n";
    s += &format!("{:<58}", "figure (median)");
    for setup in setups {
        s += &format!("{:>16}", format!("{setup:?}").to_lowercase());
    }
    s += &format!("{:>10}  {:<16} met\n", "cowfs/nat", "target");
    for f in &report.figures {
        s += &format!("{:<58}", format!("{} [{}]", f.name, f.unit));
        for setup in setups {
            let v = f
                .values
                .iter()
                .find(|(x, _)| x == setup)
                .and_then(|(_, v)| *v);
            s += &match v {
                Some(v) if v >= 100.0 => format!("{v:>16.0}"),
                Some(v) => format!("{v:>16.3}"),
                None => format!("{:>16}", "-"),
            };
        }
        let ratio = f.cowfs_vs_native.map_or("-".into(), |r| format!("{r:.2}x"));
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        s += &format!("{ratio:>10}  {:<16} {met}\n", f.target);
    }
    s
}
