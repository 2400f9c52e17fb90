//! `umlctl doctor`: what this host supports, each item found out by trying
//! it (seize a child with ptrace, open a userfaultfd, open /dev/fuse, ...),
//! never by guessing from versions. `--boot` also boots a real UML guest.

use crate::cmd::vm::host::Uml;
use crate::exit::{fail, CliResult, Code};
use crate::output::Output;
use serde::Serialize;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Also build an image and boot a UML guest (about 2 s).
    #[arg(long)]
    pub boot: bool,
}

#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    /// Whether `umlctl vm` needs it (the others serve snapshots and cowfs).
    needed_for_vms: bool,
    detail: String,
}

#[derive(Serialize)]
struct Report {
    ok: bool,
    uml: Option<Uml>,
    checks: Vec<Check>,
}

fn check(name: &'static str, needed_for_vms: bool, result: Result<String, String>) -> Check {
    let (ok, detail) = match result {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    Check {
        name,
        ok,
        needed_for_vms,
        detail,
    }
}

pub fn run(out: Output, args: DoctorArgs) -> CliResult {
    let uml = Uml::find().ok();
    let mut checks = vec![
        check("uml", true, uml_kernel(uml.as_ref())),
        check("seccomp", true, seccomp()),
        check("/dev/shm", true, dev_shm()),
        check("busybox-static", true, busybox()),
        check("mkfs.ext4", true, tool_runs("mkfs.ext4", &["-V"])),
        check("ptrace", false, ptrace_seize()),
        check("userfaultfd", false, userfaultfd()),
        check("fuse", true, open_rw("/dev/fuse")),
        check("fuse-io-uring", false, fuse_io_uring()),
        check("cpu-wakeup", false, cross_cpu_wakeup()),
        check("tun", false, open_rw("/dev/net/tun")),
        check("namespaces", false, namespaces()),
        check("iproute2", false, tool_runs("ip", &["-V"])),
    ];
    if args.boot {
        checks.push(check("boot", true, boot_a_guest()));
    }
    let ok = checks.iter().all(|c| c.ok || !c.needed_for_vms);
    let report = Report { ok, uml, checks };
    out.emit(&report, || human(&report));
    if ok {
        return Ok(());
    }
    if out.json {
        // One JSON document: the report says what failed.
        std::process::exit(Code::Environment as i32);
    }
    fail(
        Code::Environment,
        "this host cannot run UML VMs yet: fix the FAIL lines above (tools/setup installs what is missing)",
    )
}

fn human(r: &Report) -> String {
    let mut s = String::new();
    for c in &r.checks {
        let mark = match (c.ok, c.needed_for_vms) {
            (true, _) => "ok  ",
            (false, true) => "FAIL",
            (false, false) => "no  ",
        };
        s.push_str(&format!("{mark} {:<15} {}\n", c.name, c.detail));
    }
    s.push_str(if r.ok {
        "UML VMs: ready"
    } else {
        "UML VMs: not ready"
    });
    s
}

fn uml_kernel(uml: Option<&Uml>) -> Result<String, String> {
    let uml = uml.ok_or("not installed: run tools/install-uml")?;
    let out = Command::new(&uml.kernel)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} does not run: {e}", uml.kernel.display()))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let degraded = if uml.mode == "seccomp" {
        ""
    } else {
        " (DEGRADED fallback: no AVX in guests)"
    };
    Ok(format!(
        "{version}, {} mode{degraded}: {}",
        uml.mode, uml.package
    ))
}

fn seccomp() -> Result<String, String> {
    let actions = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail")
        .map_err(|_| "no seccomp filters in this kernel: UML 7 needs seccomp=off".to_string())?;
    Ok(format!("filters available ({})", actions.trim()))
}

fn dev_shm() -> Result<String, String> {
    let st = nix::sys::statfs::statfs("/dev/shm").map_err(|e| format!("/dev/shm: {e}"))?;
    if st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC {
        Ok("tmpfs (UML keeps guest memory there)".into())
    } else {
        Err("/dev/shm is not tmpfs: UML needs it for guest memory".into())
    }
}

fn busybox() -> Result<String, String> {
    let out = Command::new("/bin/busybox")
        .output()
        .map_err(|_| "missing: apt-get install busybox-static".to_string())?;
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    Ok(first)
}

fn tool_runs(tool: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|_| format!("{tool} is missing (run tools/setup)"))?;
    let text = [out.stdout, out.stderr].concat();
    Ok(String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// One-way wakeups slower than this are reported: a FUSE request whose
/// reply wakes its caller on another CPU pays one.
const SLOW_WAKEUP_US: f64 = 15.0;

/// How long an idle vCPU polls before it halts (cpuidle-haltpoll).
const HALT_POLL: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

/// Measures what waking a thread on another, idle CPU costs: two threads
/// pinned to CPUs 0 and 1 pass a byte back and forth through pipes; each
/// CPU goes idle while its thread waits in read(2), so every pass wakes an
/// idle CPU, as a FUSE reply does when the caller waits on the other one.
/// On a VM whose idle vCPUs halt at once it costs tens of microseconds, and
/// cowfs metadata work (a FUSE round trip per lookup) gets up to 2x
/// slower whenever the scheduler wakes the caller on the other CPU.
fn cross_cpu_wakeup() -> Result<String, String> {
    let Some(median) = wakeup_us()? else {
        return Ok("one CPU: no cross-CPU wakeups".into());
    };
    let text = format!("waking a thread on an idle CPU takes {median:.1} us");
    if median <= SLOW_WAKEUP_US {
        return Ok(text);
    }
    let poll = std::fs::read_to_string(HALT_POLL).map(|s| s.trim().to_string());
    Err(match poll {
        Ok(ns) if ns == "0" => format!(
            "{text}: idle vCPUs halt at once (guest_halt_poll_ns=0), which slows FUSE \
             round trips; the kernel's default polls first: echo 200000 > {HALT_POLL}"
        ),
        _ => format!("{text}, which slows FUSE round trips"),
    })
}

/// The median one-way wakeup of a thread on another, idle CPU, in
/// microseconds (see `cross_cpu_wakeup`); None with one CPU.
pub(crate) fn wakeup_us() -> Result<Option<f64>, String> {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::{pipe, read, write, Pid};
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return Ok(None);
    }
    let pin = |cpu: usize| -> Result<(), String> {
        let mut set = CpuSet::new();
        set.set(cpu).map_err(|e| e.to_string())?;
        sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| format!("pin to CPU {cpu}: {e}"))
    };
    let e = |e: nix::Error| e.to_string();
    let (ping_r, ping_w) = pipe().map_err(e)?;
    let (pong_r, pong_w) = pipe().map_err(e)?;
    const ROUNDS: usize = 200;
    let echo = std::thread::spawn(move || -> Result<(), String> {
        pin(1)?;
        let mut b = [0u8];
        for _ in 0..ROUNDS {
            if read(&ping_r, &mut b).map_err(e)? == 0 {
                return Err("the ping thread stopped".into());
            }
            write(&pong_w, &b).map_err(e)?;
        }
        Ok(())
    });
    // The pipe ends move into the threads: if either fails, the other
    // sees end of file or EPIPE instead of waiting for ever.
    let ping = std::thread::spawn(move || -> Result<Vec<f64>, String> {
        pin(0)?;
        let mut b = [0u8];
        let mut times = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let t = Instant::now();
            write(&ping_w, &b).map_err(e)?;
            if read(&pong_r, &mut b).map_err(e)? == 0 {
                return Err("the echo thread stopped".into());
            }
            times.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
        }
        Ok(times)
    });
    let panicked = |_| "a wakeup thread panicked".to_string();
    let mut times = ping.join().map_err(panicked)??;
    echo.join().map_err(panicked)??;
    times.sort_by(f64::total_cmp);
    Ok(Some(times[ROUNDS / 2]))
}

/// Mounts a scratch cowfs store with FUSE over io_uring and reads a file
/// through it: what `umlctl fs mount --io-uring` needs.
fn fuse_io_uring() -> Result<String, String> {
    let t = tempfile::tempdir().map_err(|e| format!("scratch directory: {e}"))?;
    let (base, mnt) = (t.path().join("base"), t.path().join("mnt"));
    for d in [&base, &mnt] {
        std::fs::create_dir(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    std::fs::write(base.join("probe"), "io_uring").map_err(|e| format!("base: {e}"))?;
    let store =
        cowfs::Store::create(&t.path().join("store"), &base, None).map_err(|e| e.to_string())?;
    let opts = cowfs::MountOptions {
        transport: cowfs::Transport::IoUring,
        ..Default::default()
    };
    let m = store.mount(&mnt, &opts).map_err(|e| e.to_string())?;
    let read = std::fs::read_to_string(mnt.join("probe"));
    m.unmount().map_err(|e| e.to_string())?;
    match read {
        Ok(text) if text == "io_uring" => Ok("a cowfs mount with --io-uring serves reads".into()),
        Ok(text) => Err(format!("read {text:?} through a --io-uring mount")),
        Err(e) => Err(format!("read through a --io-uring mount: {e}")),
    }
}

fn open_rw(path: &str) -> Result<String, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(|_| format!("{path} opens"))
        .map_err(|e| format!("{path}: {e}"))
}

/// Seizes a child of ours with PTRACE_SEIZE, then lets it go.
fn ptrace_seize() -> Result<String, String> {
    use nix::sys::ptrace;
    use nix::unistd::Pid;
    let mut child = Command::new("sleep")
        .arg("5")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start a child: {e}"))?;
    let pid = Pid::from_raw(child.id() as i32);
    let r = ptrace::seize(pid, ptrace::Options::empty())
        .map(|_| "PTRACE_SEIZE works".to_string())
        .map_err(|e| format!("PTRACE_SEIZE: {e}"));
    let _ = child.kill();
    let _ = child.wait();
    r
}

fn userfaultfd() -> Result<String, String> {
    // SAFETY: the userfaultfd syscall takes flags only; the fd it returns is closed here.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd >= 0 {
        // SAFETY: fd is ours and closed once.
        unsafe { libc::close(fd as i32) };
        return Ok("userfaultfd() works".into());
    }
    let err = std::io::Error::last_os_error();
    open_rw("/dev/userfaultfd").map_err(|e| format!("userfaultfd(): {err}; {e}"))
}

/// Starts `true` in new network and mount namespaces.
fn namespaces() -> Result<String, String> {
    let mut cmd = Command::new("true");
    // SAFETY: unshare is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            nix::sched::unshare(
                nix::sched::CloneFlags::CLONE_NEWNET | nix::sched::CloneFlags::CLONE_NEWNS,
            )
            .map_err(std::io::Error::from)
        });
    }
    match cmd.status() {
        Ok(s) if s.success() => Ok("network and mount namespaces can be made".into()),
        Ok(s) => Err(format!("unshare failed ({s})")),
        Err(e) => Err(format!("unshare: {e}")),
    }
}

/// Builds an image and boots a guest in a scratch VM directory, through
/// this very binary, and runs a command in it.
fn boot_a_guest() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let image = dir.path().join("doctor.img");
    let image = image.to_string_lossy();
    let run = |args: &[&str]| -> Result<String, String> {
        let out = Command::new(&me)
            .args(args)
            .env("UMLCTL_VM_DIR", dir.path().join("vms"))
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    };
    run(&["vm", "image", "build", "--size", "64M", "--out", &image])?;
    run(&["vm", "create", "doctor", "--image", &image, "--mem", "64M"])?;
    let began = Instant::now();
    let booted = run(&["vm", "start", "doctor"]);
    let boot_ms = began.elapsed().as_millis();
    let answer = booted.and_then(|_| run(&["vm", "exec", "doctor", "--", "uname", "-sr"]));
    let _ = run(&["vm", "rm", "--force", "doctor"]);
    Ok(format!(
        "guest booted in {boot_ms} ms and answered: {}",
        answer?.trim()
    ))
}
