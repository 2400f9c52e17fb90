//! The supervisor: one background process per running VM (`umlctl vm
//! __supervise NAME`, started by `vm start`). UML needs someone to hold its
//! console pipes open for its whole life (a closed console ends the VM), so
//! that someone also does the rest:
//! - starts the UML kernel with the console on pipes (con0) and the exec
//!   agent's line on another pair (con1, the guest's /dev/tty1);
//! - copies console output to console.log and to attached `vm console`s;
//! - serves the control socket (see control.rs): readiness, exec, console;
//! - when UML exits, records whether that was asked for (`run/stopping`) or a
//!   death (`dead.json`), removes the VM's tap, and deletes `run/` so that
//!   nothing is left behind.

use super::control::{shell_join, Reply, Request};
use super::host::{path_str, Uml};
use super::state::{self, now_unix, write_private, Store, Vm};
use super::{disk, net};
use crate::exit::{CliError, CliResult, Code};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often the VM's disk is flushed to its layer (see DiskFlusher).
const DISK_FLUSH_EVERY: Duration = Duration::from_secs(1);

/// How long UML's processes get to exit after SIGKILL before the disk is
/// unmounted anyway (less than `vm stop` waits for the supervisor).
const LEFTOVERS_PATIENCE: Duration = Duration::from_secs(3);

/// console.log is restarted when it grows past this.
const CONSOLE_LOG_MAX: u64 = 8 << 20;

/// The first line the guest agent prints (tools/uml/agent).
const AGENT_READY: &str = "UMLCTL-READY";

/// Where the boot is.
#[derive(Clone, Debug, PartialEq)]
enum Phase {
    Booting,
    Ready,
    /// UML exited or the boot failed; the reason.
    Over(String),
}

/// What the threads of the supervisor share.
struct Shared {
    phase: Mutex<Phase>,
    phase_changed: Condvar,
    /// The exec agent's line: requests are written here, one at a time.
    exec: Mutex<ExecLine>,
    /// Input to the guest console.
    console_in: Mutex<File>,
    /// Attached `vm console` clients.
    console_clients: Mutex<Vec<UnixStream>>,
    uml_pid: u32,
    mem_mib: u64,
}

struct ExecLine {
    to_guest: File,
    from_guest: Receiver<String>,
    next_id: u64,
}

pub fn run(name: &str) -> CliResult {
    // Everything UML and we create (its COW file, mconsole socket, the
    // console log) is private to root.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let store = Store::open()?;
    let vm = store.load(name)?;
    let uml = Uml::find()?;
    write_private(
        &vm.run_dir().join("supervisor.pid"),
        std::process::id().to_string().as_bytes(),
    )?;
    // Held until UML is gone: dropping it unmounts the disk.
    let mount = disk::attach(&vm)?;
    let tap = vm.config.ip.as_deref().map(net::attach).transpose()?;
    let (line_tx, line_rx) = mpsc::channel();
    let launched = launch(&vm, &uml, tap.as_deref(), line_rx).inspect_err(|_| {
        if let Some(tap) = &tap {
            net::detach(tap);
        }
    })?;
    let Launched {
        mut child,
        shared,
        console_out,
        agent_out,
    } = launched;
    tracing::info!(vm = name, pid = shared.uml_pid, "UML started");
    let listener = UnixListener::bind(vm.control_socket())?;
    std::fs::set_permissions(vm.control_socket(), std::fs::Permissions::from_mode(0o600))?;
    let shared = Arc::new(shared);
    let console_ended =
        spawn_console_reader(shared.clone(), console_out, File::create(vm.console_log())?);
    spawn_exec_reader(shared.clone(), agent_out, line_tx);
    let flusher = DiskFlusher::start(vm.clone());
    let s = shared.clone();
    std::thread::spawn(move || serve(s, listener));

    let status = child.wait()?;
    // What UML printed before it died may still be in the console pipe (an
    // out-of-memory boot ends in SIGABRT right after saying so): its last
    // processes go, then the reader gets to the end, before the verdict.
    kill_leftovers(&vm);
    let _ = console_ended.recv_timeout(std::time::Duration::from_secs(2));
    let reason = why_it_ended(&vm, &shared, status);
    let ending = reason
        .clone()
        .unwrap_or_else(|| "the VM was stopped".into());
    set_phase(&shared, Phase::Over(ending));
    // The disk cannot be unmounted while anyone holds a file in it: the
    // flusher's open file, or UML's stubs, which exit after the kernel
    // process (a SIGKILLed process closes its files as it exits).
    flusher.stop();
    kill_leftovers(&vm);
    wait_group_gone(&vm, LEFTOVERS_PATIENCE);
    if let Some(mount) = mount {
        disk::detach(&vm, mount);
    }
    finish(&vm, reason, tap);
    Ok(())
}

/// None when the VM was stopped on purpose; else why it died.
fn why_it_ended(vm: &Vm, shared: &Shared, status: std::process::ExitStatus) -> Option<String> {
    if vm.run_dir().join("stopping").exists() {
        return None;
    }
    match &*shared.phase.lock().unwrap() {
        Phase::Over(boot_failure) => Some(boot_failure.clone()),
        _ => Some(format!("UML exited unexpectedly ({status})")),
    }
}

/// A started UML and the host ends of its console and agent line.
struct Launched {
    child: std::process::Child,
    shared: Shared,
    console_out: OwnedFd,
    agent_out: OwnedFd,
}

/// Starts UML with its console (con0) and the agent's line (con1) on pipes.
fn launch(
    vm: &Vm,
    uml: &Uml,
    tap: Option<&str>,
    from_agent: Receiver<String>,
) -> CliResult<Launched> {
    let (con_in_r, con_in_w) = pipe()?;
    let (con_out_r, con_out_w) = pipe()?;
    let (agent_in_r, agent_in_w) = pipe()?;
    let (agent_out_r, agent_out_w) = pipe()?;

    let (program, mut args) = uml.command_prefix();
    args.extend(kernel_args(vm, uml));
    let netns = match (tap, &vm.config.ip) {
        (Some(tap), Some(ip)) => {
            let mac = net::mac_for(ip);
            args.push(format!("vec0:transport=tap,ifname={tap},mac={mac}"));
            Some(net::namespace_file()?)
        }
        _ => None,
    };
    tracing::debug!(?program, ?args, "starting UML");
    let mut cmd = Command::new(&program);
    cmd.args(&args)
        .stdin(Stdio::from(con_in_r))
        .stdout(Stdio::from(con_out_w.try_clone()?))
        .stderr(Stdio::from(con_out_w));
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    wire_child(
        &mut cmd,
        agent_in_r.as_raw_fd(),
        agent_out_w.as_raw_fd(),
        netns_fd,
    );
    let child = cmd.spawn().map_err(|e| {
        CliError::new(
            Code::Environment,
            format!("cannot start UML kernel {}: {e}", program.display()),
        )
    })?;
    drop((agent_in_r, agent_out_w, netns));
    write_private(
        &vm.run_dir().join("uml.pid"),
        child.id().to_string().as_bytes(),
    )?;
    let shared = Shared {
        phase: Mutex::new(Phase::Booting),
        phase_changed: Condvar::new(),
        exec: Mutex::new(ExecLine {
            to_guest: File::from(agent_in_w),
            from_guest: from_agent,
            next_id: 1,
        }),
        console_in: Mutex::new(File::from(con_in_w)),
        console_clients: Mutex::new(vec![]),
        uml_pid: child.id(),
        mem_mib: vm.config.mem_mib,
    };
    Ok(Launched {
        child,
        shared,
        console_out: con_out_r,
        agent_out: agent_out_r,
    })
}

/// In the child, before exec: the agent's pipe ends become fds 3 and 4
/// (con1=fd:3,fd:4), UML gets its own process group (so that `vm kill`
/// reaches its stubs too), and joins the VM network's namespace.
fn wire_child(cmd: &mut Command, agent_in: i32, agent_out: i32, netns: Option<i32>) {
    // SAFETY: between fork and exec this closure only makes async-signal-safe
    // system calls (fcntl, dup2, setpgid, setns) on descriptors we own.
    unsafe {
        cmd.pre_exec(move || {
            // Copy the pipe ends above 10 first so dup2 never meets its own target.
            let a = libc::fcntl(agent_in, libc::F_DUPFD_CLOEXEC, 10);
            let b = libc::fcntl(agent_out, libc::F_DUPFD_CLOEXEC, 10);
            if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setpgid(0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = netns {
                if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The UML kernel command line for this VM.
pub fn kernel_args(vm: &Vm, uml: &Uml) -> Vec<String> {
    let mut args = vec![
        disk::kernel_arg(vm),
        "root=/dev/ubda".into(),
        "rw".into(),
        "init=/init".into(),
        format!("mem={}M", vm.config.mem_mib),
        "con=null".into(),
        "con0=fd:0,fd:1".into(),
        "con1=fd:3,fd:4".into(),
        "ssl=null".into(),
        format!("uml_dir={}", path_str(&vm.run_dir())),
        "umid=uml".into(),
        format!("umlctl_name={}", vm.name()),
    ];
    if let Some(ip) = &vm.config.ip {
        args.push(format!("umlctl_ip={ip}/{}", net::PREFIX_LEN));
    }
    args.extend(uml.mode_args());
    args
}

fn pipe() -> CliResult<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| CliError::new(Code::Internal, format!("pipe: {e}")))
}

fn set_phase(shared: &Shared, phase: Phase) {
    let mut p = shared.phase.lock().unwrap();
    // The first ending is the one that explains.
    if !matches!(*p, Phase::Over(_)) {
        *p = phase;
    }
    shared.phase_changed.notify_all();
}

/// Console output: to the log, to attached clients, and watched for boot
/// failures that would otherwise leave a kernel spinning.
/// Returns a receiver that disconnects once the console reaches its end.
fn spawn_console_reader(
    shared: Arc<Shared>,
    from_uml: OwnedFd,
    mut log: File,
) -> std::sync::mpsc::Receiver<()> {
    let (ended, ended_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _ended = ended;
        let mut from_uml = File::from(from_uml);
        let mut buf = [0u8; 8192];
        let mut recent: Vec<u8> = vec![];
        let mut logged = 0u64;
        loop {
            let n = match from_uml.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // A chatty guest must not fill the host's disk: start over.
            if logged > CONSOLE_LOG_MAX {
                let _ = log.set_len(0).and_then(|_| log.rewind());
                let _ = log.write_all(b"[umlctl: console.log restarted at its size limit]\n");
                logged = 0;
            }
            logged += n as u64;
            let _ = log.write_all(&buf[..n]);
            shared
                .console_clients
                .lock()
                .unwrap()
                .retain_mut(|c| c.write_all(&buf[..n]).is_ok());
            if *shared.phase.lock().unwrap() == Phase::Booting {
                recent.extend_from_slice(&buf[..n]);
                if let Some(why) = boot_failure(&String::from_utf8_lossy(&recent), shared.mem_mib) {
                    tracing::warn!("{why}");
                    set_phase(&shared, Phase::Over(why));
                    // SAFETY: kill has no memory-safety preconditions; the
                    // group is UML's own (setpgid in launch).
                    unsafe { libc::kill(-(shared.uml_pid as i32), libc::SIGKILL) };
                }
                // Only the tail matters; keep it bounded.
                let excess = recent.len().saturating_sub(4096);
                recent.drain(..excess);
            }
        }
    });
    ended_rx
}

/// Recognises console output that means the boot cannot succeed.
fn boot_failure(console: &str, mem_mib: u64) -> Option<String> {
    if console.contains("Too few physical memory") || console.contains("invoked oom-killer") {
        return Some(format!(
            "the guest ran out of memory while booting with {mem_mib} MiB: recreate the VM with a larger --mem (64M or more)"
        ));
    }
    console
        .lines()
        .find(|l| l.contains("Kernel panic"))
        .map(|l| format!("the guest kernel panicked while booting: {}", l.trim()))
}

/// UML does not fsync its disk when the guest syncs (traced: no fsync
/// reaches the host), so the guest's writes would sit in the host's page
/// cache, and over a cowfs mount they would be lost if this process died.
/// Flushing the disk every second bounds that loss to a second.
struct DiskFlusher {
    /// Dropping it ends the thread's wait at once.
    stop: Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl DiskFlusher {
    fn start(vm: Vm) -> DiskFlusher {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(DISK_FLUSH_EVERY) {
                if let Err(e) = disk::flush(&vm) {
                    tracing::debug!("flushing the disk: {e}");
                }
            }
        });
        DiskFlusher { stop, thread }
    }

    /// Returns once no flush runs or will run (its open file would make
    /// the disk's unmount fail with EBUSY).
    fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// Lines from the exec agent: the ready banner, and replies for `exec`.
fn spawn_exec_reader(shared: Arc<Shared>, from_guest: OwnedFd, to_exec: Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(File::from(from_guest)).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r').to_string();
            if line == AGENT_READY {
                // Queued before the phase says Ready, so that an exec that
                // sees Ready finds the banner and drops it; queued after, it
                // could reach that exec as the sign of an agent restart. (An
                // agent that restarts mid-command never answers it.)
                let _ = to_exec.send(line);
                set_phase(&shared, Phase::Ready);
            } else if line.starts_with("R ") {
                let _ = to_exec.send(line);
            } else {
                tracing::debug!(line, "stray line from the exec agent");
            }
        }
    });
}

fn serve(shared: Arc<Shared>, listener: UnixListener) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let s = shared.clone();
        std::thread::spawn(move || {
            if let Err(e) = handle(&s, stream) {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}

fn handle(shared: &Shared, stream: UnixStream) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Reply::err(format!("bad request: {e}")),
        Ok(Request::WaitReady { timeout_ms }) => {
            wait_ready(shared, Duration::from_millis(timeout_ms))
        }
        Ok(Request::Exec { argv, timeout_ms }) => {
            exec(shared, &argv, timeout_ms.map(Duration::from_millis))
        }
        Ok(Request::Console) => {
            send(
                &stream,
                &Reply {
                    ok: true,
                    ..Reply::default()
                },
            )?;
            return attach_console(shared, stream);
        }
    };
    send(&stream, &reply)
}

fn send(mut stream: &UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut text = serde_json::to_string(reply).expect("serializable reply");
    text.push('\n');
    stream.write_all(text.as_bytes())
}

fn wait_ready(shared: &Shared, timeout: Duration) -> Reply {
    let phase = shared.phase.lock().unwrap();
    let (phase, _) = shared
        .phase_changed
        .wait_timeout_while(phase, timeout, |p| *p == Phase::Booting)
        .unwrap();
    match &*phase {
        Phase::Ready => Reply {
            ok: true,
            ..Reply::default()
        },
        Phase::Over(why) => Reply::err(why.clone()),
        Phase::Booting => Reply::err(format!(
            "the guest's exec agent did not answer within {} s (is the image from `umlctl vm image build`?)",
            timeout.as_secs()
        )),
    }
}

fn exec(shared: &Shared, argv: &[String], timeout: Option<Duration>) -> Reply {
    if argv.is_empty() {
        return Reply::err("no command given");
    }
    if *shared.phase.lock().unwrap() != Phase::Ready {
        return Reply::err("the guest is not ready (still booting, or stopped)");
    }
    let mut line = shared.exec.lock().unwrap();
    // Drop what no one waits for: the boot's ready banner, late answers.
    while line.from_guest.try_recv().is_ok() {}
    let id = line.next_id;
    line.next_id += 1;
    let cmd = printf_b_escape(&shell_join(argv));
    if let Err(e) = writeln!(line.to_guest, "X {id} {cmd}") {
        return Reply::err(format!("writing to the guest agent: {e}"));
    }
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let got = match deadline {
            Some(d) => line
                .from_guest
                .recv_timeout(d.saturating_duration_since(Instant::now())),
            None => line
                .from_guest
                .recv()
                .map_err(|_| RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(l) if l == AGENT_READY => {
                return Reply::err("the guest agent restarted while running the command")
            }
            Ok(l) => {
                if let Some(r) = parse_result(&l, id) {
                    return r;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                return Reply::err("timed out waiting for the command")
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Reply::err("the VM stopped while running the command")
            }
        }
    }
}

/// Escapes a command for the agent's `printf %b`: printable ASCII passes
/// as it is (the agent decodes with a shell builtin, no fork); backslashes,
/// control bytes (newline ends a request) and non-ASCII bytes become \0ooo.
fn printf_b_escape(cmd: &str) -> String {
    let mut out = String::with_capacity(cmd.len());
    for &b in cmd.as_bytes() {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\0{b:03o}"));
        }
    }
    out
}

/// Parses `R <id> <status> b<stdout> b<stderr>` for request `id`.
fn parse_result(line: &str, id: u64) -> Option<Reply> {
    let mut f = line.split(' ');
    let (_, rid, status, out, err) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    if rid.parse::<u64>().ok()? != id {
        return None; // a late answer to a request that timed out
    }
    Some(Reply {
        ok: true,
        status: status.parse().ok(),
        stdout_b64: Some(out.strip_prefix('b')?.to_string()),
        stderr_b64: Some(err.strip_prefix('b')?.to_string()),
        error: None,
    })
}

/// Console client: its input goes to the guest console until it hangs up;
/// output reaches it through the console reader.
fn attach_console(shared: &Shared, stream: UnixStream) -> std::io::Result<()> {
    shared
        .console_clients
        .lock()
        .unwrap()
        .push(stream.try_clone()?);
    let mut buf = [0u8; 4096];
    let mut stream = stream;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        shared.console_in.lock().unwrap().write_all(&buf[..n])?;
    }
}

/// After UML exits: say why if it died, undo the network, leave no run files.
fn finish(vm: &Vm, died: Option<String>, tap: Option<String>) {
    match &died {
        Some(reason) => {
            tracing::warn!(vm = vm.name(), "{reason}");
            let record = serde_json::json!({"reason": reason, "at_unix": now_unix()});
            let _ = write_private(&vm.dead_file(), record.to_string().as_bytes());
        }
        None => {
            let _ = std::fs::remove_file(vm.dead_file());
        }
    }
    if let Some(tap) = tap {
        net::detach(&tap);
    }
    kill_leftovers(vm);
    vm.remove_run_dir();
}

/// UML's process group: its kernel process's pid, from the pid file.
fn uml_group(vm: &Vm) -> Option<i32> {
    std::fs::read_to_string(vm.run_dir().join("uml.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
}

/// Kills what is left of UML's process group (stubs, helpers), if anything.
pub fn kill_leftovers(vm: &Vm) {
    if let Some(pgid) = uml_group(vm) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

/// Waits, up to `patience`, until no process of UML's group runs. Zombies
/// count as gone: a process has closed its files before it is one.
fn wait_group_gone(vm: &Vm, patience: Duration) {
    let Some(pgid) = uml_group(vm) else { return };
    let deadline = Instant::now() + patience;
    while group_runs(pgid) {
        if Instant::now() > deadline {
            tracing::warn!(pgid, "UML's processes outlived SIGKILL");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a process of group `pgid` is alive and not yet a zombie.
fn group_runs(pgid: i32) -> bool {
    state::group_members(pgid)
        .unwrap_or_default()
        .into_iter()
        .any(state::pid_alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group runs while a member runs, and not once its members are
    /// zombies (they have closed their files): the disk can go then.
    #[test]
    fn a_group_of_zombies_does_not_run() {
        let mut child = Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id() as i32;
        assert!(group_runs(pgid));
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(-pgid, libc::SIGKILL) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while group_runs(pgid) {
            assert!(Instant::now() < deadline, "the killed group still runs");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Not reaped yet: a zombie, and still in its group.
        let stat = std::fs::read_to_string(format!("/proc/{pgid}/stat")).unwrap();
        assert!(stat.contains(") Z "), "{stat}");
        child.wait().unwrap();
        assert!(!group_runs(pgid));
    }

    #[test]
    fn results_match_their_request() {
        let r = parse_result("R 7 3 baGk= b", 7).unwrap();
        assert_eq!(r.status, Some(3));
        assert_eq!(r.stdout_b64.as_deref(), Some("aGk="));
        assert_eq!(r.stderr_b64.as_deref(), Some(""));
        assert!(parse_result("R 6 0 b b", 7).is_none());
        assert!(parse_result("R 7 0", 7).is_none());
    }

    #[test]
    fn escapes_what_printf_b_would_interpret() {
        assert_eq!(printf_b_escape("'echo' 'a b'"), "'echo' 'a b'");
        assert_eq!(
            printf_b_escape("a\\n\nb\té"),
            "a\\0134n\\0012b\\0011\\0303\\0251"
        );
        // The guest's decoder, where this host has it.
        if let Ok(out) = Command::new("/bin/busybox")
            .args(["printf", "%b", &printf_b_escape("x\\y\n'z' é%s")])
            .output()
        {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "x\\y\n'z' é%s");
        }
    }

    #[test]
    fn recognises_boot_failures() {
        assert!(boot_failure("x\nToo few physical memory! Needed=1\n", 16)
            .unwrap()
            .contains("--mem"));
        assert!(boot_failure("swapper/0 invoked oom-killer: gfp", 32).is_some());
        assert!(boot_failure("Kernel panic - not syncing: VFS\n", 64)
            .unwrap()
            .contains("VFS"));
        assert!(boot_failure("Run /init as init process\n", 64).is_none());
    }
}
