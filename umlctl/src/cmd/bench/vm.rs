//! `umlctl bench vm`: UML VM figures, each beside a baseline measured in the
//! same run. Everything is driven through this binary's own `vm` commands in
//! a scratch VM directory, so the figures are what a user gets.
//!
//! | figure                          | baseline                                 |
//! |---------------------------------|------------------------------------------|
//! | boot to shell prompt, per disk  | bare UML kernel: boot and power off      |
//! | `vm exec` round trip            | spawning /bin/true on the host           |
//! | checkpoint (pause and total)    | copying the whole image (a full copy)    |
//! | rollback (stop, restore, start) | restarting the VM (stop and start)       |
//! | host memory per idle VM (PSS)   | the guest memory it was given (--mem)    |
//! | disk space of N VMs, one base   | N copies of the image (sparse, as cp)    |

use crate::cmd::vm::{group_members, parse_size, tree_bytes};
use crate::exit::{fail, CliError, CliResult, Code};
use crate::output::Output;
use serde::Serialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct VmBenchArgs {
    /// Repetitions of each timed step (medians are reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// VMs started from one base for the memory and disk figures.
    #[arg(long, default_value_t = 10)]
    pub vms: usize,
    /// Size of the base image.
    #[arg(long, default_value = "1G")]
    pub image_size: String,
    /// Guest memory of each VM.
    #[arg(long, default_value = "128M")]
    pub mem: String,
}

#[derive(Serialize)]
struct Row {
    measure: String,
    median: f64,
    unit: &'static str,
    baseline: String,
    baseline_median: f64,
}

/// A scratch VM directory and the binary to drive.
struct Lab {
    dir: tempfile::TempDir,
    me: PathBuf,
    image: PathBuf,
}

impl Lab {
    fn umlctl(&self, args: &[&str]) -> CliResult<String> {
        let out = Command::new(&self.me)
            .args(args)
            .env("UMLCTL_VM_DIR", self.vms())
            .output()?;
        if !out.status.success() {
            return fail(
                Code::Internal,
                format!(
                    "bench: umlctl {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn json(&self, args: &[&str]) -> CliResult<serde_json::Value> {
        let text = self.umlctl(&[&["--json"], args].concat())?;
        serde_json::from_str(&text)
            .map_err(|e| CliError::new(Code::Internal, format!("bench: {e}")))
    }

    fn vms(&self) -> PathBuf {
        self.dir.path().join("vms")
    }

    fn create(&self, name: &str, disk: &str, mem: &str) -> CliResult {
        let image = self.image.to_string_lossy();
        self.umlctl(&[
            "vm", "create", name, "--image", &image, "--disk", disk, "--mem", mem,
        ])
        .map(|_| ())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Ok(list) = self.json(&["vm", "list"]) {
            for vm in list.as_array().into_iter().flatten() {
                let _ = self.umlctl(&["vm", "rm", "--force", vm["name"].as_str().unwrap_or("")]);
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

pub fn run(out: Output, a: VmBenchArgs) -> CliResult {
    let dir = tempfile::Builder::new()
        .prefix("umlctl-bench-vm-")
        .tempdir()?;
    let lab = Lab {
        image: dir.path().join("base.img"),
        dir,
        me: std::env::current_exe()?,
    };
    let image = lab.image.to_string_lossy().into_owned();
    lab.umlctl(&[
        "vm",
        "image",
        "build",
        "--out",
        &image,
        "--size",
        &a.image_size,
    ])?;
    let runs = a.runs.max(1);
    let bare = median(
        (0..runs)
            .map(|_| bare_boot(&lab))
            .collect::<CliResult<_>>()?,
    );
    let mut rows = vec![];
    for disk in ["cowfs", "uml-cow"] {
        rows.push(boot_row(&lab, disk, runs, bare)?);
    }
    rows.push(exec_row(&lab, runs * 4)?);
    for disk in ["cowfs", "uml-cow"] {
        rows.extend(checkpoint_rows(&lab, disk, runs)?);
    }
    rows.extend(fleet_rows(&lab, a.vms.max(1), &a.mem)?);
    out.emit(&rows, || table(&rows));
    Ok(())
}

fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<44} {:>10}   {:<40} {:>10} {:>8}\n",
        "measure (median)", "value", "baseline, same run", "value", "ratio"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<44} {:>7.1} {:<2} {:<40} {:>7.1} {:<2} {:>7.2}x\n",
            r.measure,
            r.median,
            r.unit,
            r.baseline,
            r.baseline_median,
            r.unit,
            r.median / r.baseline_median
        ));
    }
    s
}

/// The UML kernel alone, no umlctl: boot the image with init = poweroff,
/// through a throwaway UML COW file. Milliseconds until the process exits.
fn bare_boot(lab: &Lab) -> CliResult<f64> {
    let uml = crate::cmd::vm::host::Uml::find()?;
    let cow = lab.dir.path().join("bare.cow");
    let _ = std::fs::remove_file(&cow);
    let (program, mut args) = uml.command_prefix();
    args.extend([
        format!("ubd0={},{}", cow.display(), lab.image.display()),
        "root=/dev/ubda".into(),
        "ro".into(),
        "mem=128M".into(),
        "con=null".into(),
        "con0=fd:0,fd:1".into(),
        format!("uml_dir={}", lab.dir.path().display()),
        "umid=bare".into(),
        "init=/sbin/poweroff".into(),
        "-f".into(),
    ]);
    args.extend(uml.mode_args());
    let began = Instant::now();
    // The console needs a pipe for output and an open input.
    let mut child = Command::new(program)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut console = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut console)?;
    child.wait()?;
    let ms = ms_since(began);
    if !console.contains("reboot: Power down") {
        return fail(Code::Internal, "bench: the bare UML boot did not power off");
    }
    Ok(ms)
}

/// `vm start` until the console shows the shell prompt, and until the
/// exec agent answers (when `vm start` returns).
fn boot_row(lab: &Lab, disk: &str, runs: usize, bare_ms: f64) -> CliResult<Row> {
    let name = format!("boot-{disk}");
    lab.create(&name, disk, "128M")?;
    let log = lab.vms().join(&name).join("console.log");
    let mut prompt = vec![];
    for _ in 0..runs {
        let _ = std::fs::remove_file(&log);
        let began = Instant::now();
        let mut start = Command::new(&lab.me)
            .args(["vm", "start", &name])
            .env("UMLCTL_VM_DIR", lab.vms())
            .stdout(Stdio::null())
            .spawn()?;
        let seen = wait_for_text(&log, "/ # ", Duration::from_secs(60));
        prompt.push(ms_since(began));
        start.wait()?;
        if !seen {
            return fail(
                Code::Internal,
                format!("bench: no shell prompt from VM {name}"),
            );
        }
        lab.umlctl(&["vm", "stop", &name])?;
    }
    lab.umlctl(&["vm", "rm", &name])?;
    Ok(Row {
        measure: format!("boot to shell prompt ({disk} disk)"),
        median: median(prompt),
        unit: "ms",
        baseline: "bare UML kernel: boot, power off".into(),
        baseline_median: bare_ms,
    })
}

fn wait_for_text(path: &Path, text: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(text)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

fn exec_row(lab: &Lab, runs: usize) -> CliResult<Row> {
    lab.create("exec", "cowfs", "128M")?;
    lab.umlctl(&["vm", "start", "exec"])?;
    let mut guest = vec![];
    let mut host = vec![];
    for _ in 0..runs {
        let t = Instant::now();
        lab.umlctl(&["vm", "exec", "exec", "--", "true"])?;
        guest.push(ms_since(t));
        let t = Instant::now();
        Command::new("true").status()?;
        host.push(ms_since(t));
    }
    lab.umlctl(&["vm", "rm", "--force", "exec"])?;
    Ok(Row {
        measure: "vm exec round trip (`true`)".into(),
        median: median(guest),
        unit: "ms",
        baseline: "spawn /bin/true on the host".into(),
        baseline_median: median(host),
    })
}

/// Checkpoint after the guest wrote 32 MiB, then rollback; against a full
/// copy of the image and a plain restart.
fn checkpoint_rows(lab: &Lab, disk: &str, runs: usize) -> CliResult<Vec<Row>> {
    let name = format!("ck-{disk}");
    lab.create(&name, disk, "128M")?;
    lab.umlctl(&["vm", "start", &name])?;
    let (mut pause, mut total, mut rollback, mut copy, mut restart) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let write = format!("dd if=/dev/urandom of=/root/blob{i} bs=1M count=32 2>/dev/null; sync");
        lab.umlctl(&["vm", "exec", &name, "--", "sh", "-c", &write])?;
        let ck = lab.json(&["vm", "checkpoint", &name, &format!("ck{i}")])?;
        pause.push(ck["pause_ms"].as_f64().unwrap_or(f64::NAN));
        total.push(ck["total_ms"].as_f64().unwrap_or(f64::NAN));
        lab.umlctl(&[
            "vm",
            "exec",
            &name,
            "--",
            "sh",
            "-c",
            "echo x > /root/after; sync",
        ])?;
        let rb = lab.json(&["vm", "rollback", &name, &format!("ck{i}")])?;
        rollback.push(rb["ms"].as_f64().unwrap_or(f64::NAN));

        let t = Instant::now();
        std::fs::copy(&lab.image, lab.dir.path().join("full-copy.img"))?;
        copy.push(ms_since(t));
        let t = Instant::now();
        lab.umlctl(&["vm", "stop", &name])?;
        lab.umlctl(&["vm", "start", &name])?;
        restart.push(ms_since(t));
    }
    let _ = std::fs::remove_file(lab.dir.path().join("full-copy.img"));
    lab.umlctl(&["vm", "rm", "--force", &name])?;
    let copy = median(copy);
    Ok(vec![
        Row {
            measure: format!("checkpoint: VM paused ({disk})"),
            median: median(pause),
            unit: "ms",
            baseline: "copy the whole image".into(),
            baseline_median: copy,
        },
        Row {
            measure: format!("checkpoint: total ({disk})"),
            median: median(total),
            unit: "ms",
            baseline: "copy the whole image".into(),
            baseline_median: copy,
        },
        Row {
            measure: format!("rollback: stop, restore, start ({disk})"),
            median: median(rollback),
            unit: "ms",
            baseline: "restart the VM (stop, start)".into(),
            baseline_median: median(restart),
        },
    ])
}

/// N idle VMs from one base: host memory each, and disk for all.
fn fleet_rows(lab: &Lab, n: usize, mem: &str) -> CliResult<Vec<Row>> {
    let names: Vec<String> = (0..n).map(|i| format!("fleet{i}")).collect();
    for name in &names {
        lab.create(name, "cowfs", mem)?;
        lab.umlctl(&["vm", "start", name])?;
    }
    std::thread::sleep(Duration::from_secs(2)); // let the guests settle
    let (mut uml_pss, mut sup_pss) = (vec![], vec![]);
    for name in &names {
        let (uml, sup) = vm_pss_kib(&lab.vms().join(name))?;
        uml_pss.push(uml as f64 / 1024.0);
        sup_pss.push(sup as f64 / 1024.0);
    }
    let mut disk = 0u64;
    for name in &names {
        lab.umlctl(&["vm", "stop", name])?;
    }
    for vm in lab.json(&["vm", "list"])?.as_array().into_iter().flatten() {
        disk += vm["disk_bytes"].as_u64().unwrap_or(0);
    }
    let base_bytes = tree_bytes(&lab.vms().join("images"));
    let mem_mib = parse_size(mem).map_err(|e| CliError::new(Code::Usage, e))? >> 20;
    // What `cp` (which keeps holes) would spend on one copy.
    let image_mib = tree_bytes(&lab.image) as f64 / (1 << 20) as f64;
    Ok(vec![
        Row {
            measure: "idle VM host memory: UML kernel+stubs (PSS)".into(),
            median: median(uml_pss),
            unit: "MB",
            baseline: "guest memory given (--mem)".into(),
            baseline_median: mem_mib as f64,
        },
        Row {
            measure: "idle VM host memory: supervisor+cowfs (PSS)".into(),
            median: median(sup_pss),
            unit: "MB",
            baseline: "guest memory given (--mem)".into(),
            baseline_median: mem_mib as f64,
        },
        Row {
            measure: format!("disk for {n} VMs from one base (layers + base)"),
            median: (disk + base_bytes) as f64 / (1 << 20) as f64,
            unit: "MB",
            baseline: format!("{n} copies of the image (cp, sparse)"),
            baseline_median: image_mib * n as f64,
        },
    ])
}

/// Proportional set size of a running VM: its UML processes (kernel and
/// stubs, one process group), and its supervisor (which serves the disk).
fn vm_pss_kib(vm_dir: &Path) -> CliResult<(u64, u64)> {
    let read_pid = |f: &str| -> Option<u32> {
        std::fs::read_to_string(vm_dir.join("run").join(f))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (Some(uml), Some(sup)) = (read_pid("uml.pid"), read_pid("supervisor.pid")) else {
        return fail(
            Code::Internal,
            format!("bench: {} is not running", vm_dir.display()),
        );
    };
    let total = group_members(uml as i32)?.into_iter().map(pss_kib).sum();
    Ok((total, pss_kib(sup)))
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
