//! Creating, starting, stopping and removing VMs.

use super::control::{self, Request};
use super::disk::{self, DiskKind};
use super::host::Uml;
use super::state::{self, now_unix, parse_size, private_dir, Status, Store, Vm, VmConfig};
use super::{mconsole, net, supervisor};
use crate::exit::{fail, CliError, CliResult, Code};
use crate::output::Output;
use serde::Serialize;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Below this UML's kernel runs out of memory before init (measured: 32M
/// fails, 40M boots; we keep a margin).
pub const MIN_MEM_MIB: u64 = 48;
/// How long `vm start` waits for the guest agent.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    pub name: String,
    /// The base image (from `vm image build`); it is never written.
    #[arg(long)]
    pub image: PathBuf,
    /// Guest memory (K, M or G).
    #[arg(long, default_value = "128M")]
    pub mem: String,
    /// Give the VM a NIC on the host-only network (10.213.0.0/24).
    #[arg(long)]
    pub net: bool,
    /// The VM's address on that network (default: the lowest free one).
    #[arg(long, requires = "net")]
    pub ip: Option<String>,
    /// How the VM's disk layer is kept.
    #[arg(long, value_enum, default_value = "cowfs")]
    pub disk: DiskKind,
}

#[derive(Serialize)]
struct VmInfo {
    name: String,
    #[serde(flatten)]
    status: Status,
    image: PathBuf,
    mem_mib: u64,
    ip: Option<String>,
    disk: DiskKind,
    /// Bytes allocated to the VM's own disk layer and checkpoints.
    disk_bytes: u64,
    checkpoints: Vec<String>,
}

pub fn create(out: Output, a: CreateArgs) -> CliResult {
    state::check_name(&a.name)?;
    let mem = parse_size(&a.mem).map_err(|e| CliError::new(Code::Usage, format!("--mem: {e}")))?;
    let mem_mib = mem >> 20;
    if mem_mib < MIN_MEM_MIB {
        return fail(
            Code::Usage,
            format!(
                "--mem {} is too small to boot a UML guest: use --mem {MIN_MEM_MIB}M or more (128M is the default)",
                a.mem
            ),
        );
    }
    let image = std::fs::canonicalize(&a.image)
        .ok()
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            CliError::new(
                Code::NotFound,
                format!(
                    "image {} does not exist: build one with `umlctl vm image build --out {0}`",
                    a.image.display()
                ),
            )
        })?;
    let store = Store::open()?;
    let dir = store.path(&a.name);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return fail(
                Code::Conflict,
                format!(
                    "a VM named {0} already exists: pick another name or remove it with `umlctl vm rm {0}`",
                    a.name
                ),
            )
        }
        Err(e) => return Err(e.into()),
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let made = (|| {
        let ip = match a.net {
            true => Some(net::allocate(&store, a.ip.as_deref())?),
            false => None,
        };
        let base_dir = disk::create(&dir, a.disk, &image)?;
        let config = VmConfig {
            name: a.name.clone(),
            image,
            disk: a.disk,
            base_dir,
            mem_mib,
            ip,
            created_unix: now_unix(),
        };
        let vm = Vm {
            dir: dir.clone(),
            config,
        };
        vm.save().map(|_| vm)
    })();
    let vm = made.inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&dir);
    })?;
    out.emit(&info(&vm), || format!("created VM {}", a.name));
    Ok(())
}

pub fn start(out: Output, name: &str) -> CliResult {
    let store = Store::open()?;
    let vm = store.load(name)?;
    Uml::find()?;
    let _lock = vm.lock()?;
    let began = Instant::now();
    boot(&store, &vm)?;
    let boot_ms = began.elapsed().as_millis() as u64;
    #[derive(Serialize)]
    struct Started<'a> {
        name: &'a str,
        pid: u32,
        boot_ms: u64,
        ip: Option<&'a str>,
    }
    let pid = vm.uml_pid().unwrap_or(0);
    let ip = vm.config.ip.as_deref();
    out.emit(
        &Started {
            name,
            pid,
            boot_ms,
            ip,
        },
        || format!("started VM {name} (pid {pid}) in {boot_ms} ms"),
    );
    Ok(())
}

/// Starts the supervisor and waits until the guest's agent answers. The
/// caller holds the VM's lock.
pub fn boot(store: &Store, vm: &Vm) -> CliResult {
    match vm.status() {
        Status::Running { pid } => {
            return fail(
                Code::Conflict,
                format!(
                "VM {0} is already running (pid {pid}): stop it first with `umlctl vm stop {0}`",
                vm.name()
            ),
            )
        }
        Status::Dead { .. } => clean_up(vm),
        Status::Stopped => {}
    }
    let base = disk::base_image(vm);
    if !base.is_file() {
        return fail(
            Code::NotFound,
            format!(
                "the base image {} of VM {} is missing: restore it, or remove the VM",
                base.display(),
                vm.name()
            ),
        );
    }
    private_dir(&vm.run_dir())?;
    let _ = std::fs::remove_file(vm.dead_file());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(vm.dir.join("supervisor.log"))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["vm", "__supervise", vm.name()])
        .env("UMLCTL_VM_DIR", &store.root)
        .env("NO_COLOR", "1")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the supervisor from
    // our session so that it outlives this command and the terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let Some(stream) = control::connect_when_up(vm, || matches!(child.try_wait(), Ok(None))) else {
        return Err(supervisor_failure(
            vm,
            child.wait().ok().and_then(|s| s.code()),
        ));
    };
    let reply = control::call_on(
        &stream,
        &Request::WaitReady {
            timeout_ms: BOOT_TIMEOUT.as_millis() as u64,
        },
    )?;
    if !reply.ok {
        let why = reply.error.unwrap_or_default();
        force_stop(vm);
        return fail(
            Code::Internal,
            format!(
                "VM {} failed to boot: {why} (console: {})",
                vm.name(),
                vm.console_log().display()
            ),
        );
    }
    Ok(())
}

/// The error a supervisor died of before it served: its own (the last
/// `umlctl: error:` line of its log) with its exit code.
fn supervisor_failure(vm: &Vm, exit_code: Option<i32>) -> CliError {
    let log_path = vm.dir.join("supervisor.log");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let why = log
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("umlctl: error: "))
        .map(str::to_string)
        .unwrap_or_else(|| format!("see {}", log_path.display()));
    let code = match exit_code {
        Some(2) => Code::Usage,
        Some(3) => Code::BadImage,
        Some(6) => Code::Conflict,
        Some(7) => Code::NotFound,
        Some(8) => Code::Environment,
        _ => Code::Internal,
    };
    clean_up(vm);
    CliError::new(code, format!("VM {} did not start: {why}", vm.name()))
}

#[derive(clap::Args, Debug)]
pub struct StopArgs {
    pub name: String,
    /// Seconds to wait for a clean shutdown before halting the VM.
    #[arg(long, default_value_t = 20)]
    pub timeout: u64,
}

pub fn stop(out: Output, a: StopArgs) -> CliResult {
    let store = Store::open()?;
    let vm = store.load(&a.name)?;
    let _lock = vm.lock()?;
    let began = Instant::now();
    let how = stop_locked(&vm, Duration::from_secs(a.timeout))?;
    report_stop(out, &vm, how, began)
}

/// How a VM came to a stop.
#[derive(Clone, Copy, Serialize, PartialEq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Stopped {
    /// The guest shut down cleanly (ctrl-alt-del, init's poweroff).
    Clean,
    /// It did not in time and was halted through mconsole, or killed.
    Halted,
    /// It was already dead; its leftovers were cleaned up.
    WasDead,
}

/// Stops a running VM: ctrl-alt-del through mconsole (our inittab powers off
/// cleanly), then `halt`, then SIGKILL. The caller holds the lock.
pub fn stop_locked(vm: &Vm, timeout: Duration) -> CliResult<Stopped> {
    match vm.status() {
        Status::Stopped => return Err(control::not_running(vm)),
        Status::Dead { .. } => {
            clean_up(vm);
            return Ok(Stopped::WasDead);
        }
        Status::Running { .. } => {}
    }
    state::write_private(&vm.run_dir().join("stopping"), b"")?;
    let mc = vm.mconsole_socket();
    if mconsole::call(&mc, "cad").is_ok() && wait_gone(vm, timeout) {
        return Ok(Stopped::Clean);
    }
    tracing::warn!(vm = vm.name(), "no clean shutdown in time; halting");
    if mconsole::call(&mc, "halt").is_ok() && wait_gone(vm, Duration::from_secs(5)) {
        return Ok(Stopped::Halted);
    }
    force_stop(vm);
    Ok(Stopped::Halted)
}

fn report_stop(out: Output, vm: &Vm, how: Stopped, began: Instant) -> CliResult {
    #[derive(Serialize)]
    struct Report<'a> {
        name: &'a str,
        how: Stopped,
        ms: u64,
    }
    let ms = began.elapsed().as_millis() as u64;
    out.emit(
        &Report {
            name: vm.name(),
            how,
            ms,
        },
        || match how {
            Stopped::Clean => format!("stopped VM {} in {ms} ms", vm.name()),
            Stopped::Halted => format!("halted VM {} (no clean shutdown)", vm.name()),
            Stopped::WasDead => format!("VM {} was dead; cleaned up", vm.name()),
        },
    );
    Ok(())
}

pub fn kill(out: Output, name: &str) -> CliResult {
    let store = Store::open()?;
    let vm = store.load(name)?;
    let _lock = vm.lock()?;
    let began = Instant::now();
    let how = match vm.status() {
        Status::Stopped => return Err(control::not_running(&vm)),
        Status::Dead { .. } => {
            clean_up(&vm);
            Stopped::WasDead
        }
        Status::Running { .. } => {
            state::write_private(&vm.run_dir().join("stopping"), b"")?;
            force_stop(&vm);
            Stopped::Halted
        }
    };
    report_stop(out, &vm, how, began)
}

/// SIGKILL to UML's process group; the supervisor then cleans up. If it is
/// gone too, clean up here.
fn force_stop(vm: &Vm) {
    supervisor::kill_leftovers(vm);
    if !wait_gone(vm, Duration::from_secs(5)) {
        if let Some(pid) = vm.supervisor_pid() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
    clean_up(vm);
}

/// Waits for the supervisor to finish: it deletes run/, then exits.
fn wait_gone(vm: &Vm, timeout: Duration) -> bool {
    let supervisor = vm.supervisor_pid();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let exited = !supervisor.is_some_and(state::pid_alive);
        if exited && !vm.run_dir().exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Removes what a dead VM left: processes, its tap, run/.
fn clean_up(vm: &Vm) {
    supervisor::kill_leftovers(vm);
    if let Some(pid) = vm.supervisor_pid() {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    if let Some(ip) = &vm.config.ip {
        net::detach(&net::tap_name(ip));
    }
    disk::detach_stale(vm);
    vm.remove_run_dir();
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    pub name: String,
    /// Stop the VM first if it runs.
    #[arg(long, short)]
    pub force: bool,
}

pub fn rm(out: Output, a: RmArgs) -> CliResult {
    let store = Store::open()?;
    let vm = store.load(&a.name)?;
    {
        let _lock = vm.lock()?;
        match vm.status() {
            Status::Running { .. } if !a.force => {
                return fail(
                    Code::Conflict,
                    format!(
                        "VM {0} is running: stop it first (`umlctl vm stop {0}`) or pass --force",
                        a.name
                    ),
                )
            }
            Status::Running { .. } => {
                stop_locked(&vm, Duration::from_secs(5))?;
            }
            Status::Dead { .. } => clean_up(&vm),
            Status::Stopped => {}
        }
        std::fs::remove_dir_all(&vm.dir)?;
    }
    if let Some(base) = &vm.config.base_dir {
        let others = store.all()?;
        disk::release_base(
            base,
            others
                .iter()
                .any(|o| o.config.base_dir.as_ref() == Some(base)),
        );
    }
    out.emit(&serde_json::json!({"removed": a.name}), || {
        format!("removed VM {}", a.name)
    });
    Ok(())
}

pub fn list(out: Output) -> CliResult {
    let store = Store::open()?;
    let vms: Vec<VmInfo> = store.all()?.iter().map(info).collect();
    out.emit(&vms, || {
        let mut s = format!(
            "{:<16} {:<8} {:>8} {:>6} {:<14} {:>10}",
            "NAME", "STATE", "PID", "MEM", "IP", "DISK"
        );
        for v in &vms {
            let pid = match v.status {
                Status::Running { pid } => pid.to_string(),
                _ => "-".into(),
            };
            s.push_str(&format!(
                "\n{:<16} {:<8} {:>8} {:>5}M {:<14} {:>9}K",
                v.name,
                v.status.word(),
                pid,
                v.mem_mib,
                v.ip.as_deref().unwrap_or("-"),
                v.disk_bytes / 1024
            ));
            if let Status::Dead { reason } = &v.status {
                s.push_str(&format!("\n    dead: {reason}"));
            }
        }
        s
    });
    Ok(())
}

fn info(vm: &Vm) -> VmInfo {
    VmInfo {
        name: vm.name().to_string(),
        status: vm.status(),
        image: vm.config.image.clone(),
        mem_mib: vm.config.mem_mib,
        ip: vm.config.ip.clone(),
        disk: vm.config.disk,
        disk_bytes: disk::usage(vm),
        checkpoints: disk::checkpoints(vm),
    }
}
