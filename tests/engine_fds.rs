//! Kernel objects through the real `umlctl`: one test per kind of fd
//! (pipes and FIFOs, eventfd, epoll, signalfd, timerfd, memfd, unix and
//! inet sockets), POSIX timers and itimers keeping their rate, established
//! TCP refused or resumed reset, and a Debian server (redis) that keeps
//! its data across snapshot, kill and resume.
//!
//! The per-kind checks live in fd_objects.c: it sets an object up, says
//! "ready", waits for a file "go" (created after the resume) and checks
//! that the object behaves as it did before the snapshot.

#[path = "common/mod.rs"]
mod common;
#[path = "engine_support.rs"]
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use support::*;

/// fd_objects.c, compiled once per test run.
fn probe() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fd_objects.c");
        let bin = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("fd-objects-{}", std::process::id()));
        let st = Command::new("cc")
            .args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&bin)
            .arg(&src)
            .arg("-lrt")
            .status()
            .expect("run cc (build-essential)");
        assert!(st.success(), "compiling fd_objects.c failed");
        bin
    })
}

/// Runs fd_objects MODE until "ready"; returns it, its directory and output.
fn start(mode: &str) -> (std::process::Child, tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    let child = spawn_sh(
        &format!("exec {} {mode}", probe().display()),
        tmp.path(),
        &out,
    );
    wait_for(&out, |t| t.contains("ready"), &format!("{mode} ready"));
    (child, tmp, out)
}

/// Snapshot (killing it), resume, let it check: its report line.
fn roundtrip(mode: &str, snap_args: &[&str]) -> String {
    let (child, tmp, out) = start(mode);
    let img = tmp.path().join("img");
    let mut args = vec!["--kill"];
    args.extend_from_slice(snap_args);
    ok(&snapshot(child.id() as i32, &img, &args));
    kill_child(child);
    // A tree keeps its pids; in the host's namespace they may have been
    // reused meanwhile (pid_max is 32768 here), so trees get a namespace.
    let ns: &[&str] = if snap_args.contains(&"--tree") {
        &["--pid-ns", "new"]
    } else {
        &[]
    };
    let pids = resume(&img, ns);
    let _reaper = Reaper::pids(pids.clone());
    fs::write(tmp.path().join("go"), "").unwrap();
    let text = wait_for(
        &out,
        |t| t.contains(&format!("{mode} ok")) || t.contains("BAD"),
        &format!("{mode} checks"),
    );
    assert!(text.contains(&format!("{mode} ok")), "{text}");
    text
}

#[test]
fn pipe_and_fifo_keep_their_buffered_bytes() {
    if can_trace() {
        roundtrip("pipe", &[]);
    }
}

#[test]
fn eventfd_keeps_counter_and_semaphore_mode() {
    if can_trace() {
        roundtrip("eventfd", &[]);
    }
}

#[test]
fn epoll_keeps_every_registration_by_fd_number() {
    if can_trace() {
        roundtrip("epoll", &[]);
    }
}

#[test]
fn signalfd_keeps_its_mask_and_pending_signal() {
    if can_trace() {
        roundtrip("signalfd", &[]);
    }
}

#[test]
fn timerfd_keeps_unread_expirations_and_period() {
    if can_trace() {
        roundtrip("timerfd", &[]);
    }
}

#[test]
fn memfd_keeps_contents_seals_offset_and_mapping() {
    if can_trace() {
        roundtrip("memfd", &[]);
    }
}

#[test]
fn unix_sockets_pairs_listeners_and_queued_messages() {
    if can_trace() {
        roundtrip("unix", &[]);
    }
}

#[test]
fn tcp_listener_and_udp_socket_come_back_on_their_ports() {
    if can_trace() {
        roundtrip("inet", &[]);
    }
}

#[test]
fn posix_flock_and_ofd_locks_are_held_again() {
    if can_trace() {
        roundtrip("locks", &[]);
    }
}

#[test]
fn tree_shares_anonymous_memory_and_file_offsets_again() {
    if can_trace() {
        roundtrip("shared", &["--tree"]);
    }
}

#[test]
fn unix_connection_between_parent_and_child_keeps_bytes_in_flight() {
    if can_trace() {
        roundtrip("unixtree", &["--tree"]);
    }
}

#[test]
fn std_stream_socket_to_the_parent_stays_connected() {
    if can_trace() {
        roundtrip("stdsock", &["--tree"]);
    }
}

#[test]
fn guard_pages_are_skipped_and_installed_again() {
    if can_trace() {
        roundtrip("guard", &[]);
    }
}

#[test]
fn o_async_owner_and_signal_come_back() {
    if can_trace() {
        roundtrip("async", &[]);
    }
}

#[test]
fn posix_timer_and_itimer_keep_their_rate() {
    if can_trace() {
        let text = roundtrip("timers", &[]);
        // 20 ms and 100 ms periods, counted over one second after resume.
        assert!(text.contains("timers ok posix="), "{text}");
    }
}

/// Snapshots fd_objects MODE, which must be refused (exit 5) with a one-line
/// error holding every `needle`, no image left and the target untouched.
fn refused(mode: &str, needles: &[&str]) {
    let (child, tmp, _out) = start(mode);
    let img = tmp.path().join("img");
    let o = snapshot(child.id() as i32, &img, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(needles.iter().all(|n| err.contains(n)), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!img.exists() && !tmp.path().join("img.partial").exists());
    assert!(alive(child.id() as i32) && status_field(child.id() as i32, "TracerPid") == "0");
    kill_child(child);
}

#[test]
fn established_tcp_is_refused_or_resumed_reset() {
    if !can_trace() {
        return;
    }
    refused(
        "established",
        &[
            "is an established TCP connection (127.0.0.1:",
            "--tcp-established close",
        ],
    );
    roundtrip("established", &["--tcp-established", "close"]);
}

#[test]
fn seccomp_filter_and_no_new_privs_come_back() {
    if can_trace() {
        roundtrip("seccomp", &[]);
    }
}

#[test]
fn seccomp_strict_mode_is_refused_before_writing() {
    if can_trace() {
        refused("strict", &["seccomp mode 1 (strict)", "cannot be resumed"]);
    }
}

#[test]
fn listener_whose_address_is_taken_fails_clearly() {
    if !can_trace() {
        return;
    }
    let (child, tmp, _out) = start("inet");
    let img = tmp.path().join("img");
    ok(&snapshot(child.id() as i32, &img, &[]));
    // The original still listens on the port.
    let o = umlctl(&["resume", img.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(6), "{err}");
    assert!(
        err.contains("address 127.0.0.1:") && err.contains("is taken"),
        "{err}"
    );
    kill_child(child);
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let o = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli (package redis-tools)");
    assert!(o.status.success(), "redis-cli {args:?} failed");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// How many sockets a process holds.
fn sockets(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter(|e| {
            fs::read_link(e.as_ref().unwrap().path())
                .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .count()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn redis_server_keeps_its_data_across_snapshot_kill_resume() {
    if !can_trace() {
        return;
    }
    let have =
        Path::new("/usr/bin/redis-server").exists() && Path::new("/usr/bin/redis-cli").exists();
    if common::skip_unless(have, "redis-server and redis-cli (tools/apt-packages)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("redis.log");
    let port = free_port();
    let child = spawn_sh(
        &format!(
            "exec redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no --io-threads 2 --dir {}",
            tmp.path().display()
        ),
        tmp.path(),
        &out,
    );
    let pid = child.id() as i32;
    let mut reaper = Reaper::child(child);
    wait_for(&out, |t| t.contains("Ready to accept"), "redis ready");
    let listening = sockets(pid);
    let script: String = (0..500).map(|i| format!("SET key{i} value{i}\n")).collect();
    let mut cli = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    cli.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(cli.wait().unwrap().success());
    redis_cli(port, &["RPUSH", "list", "a", "b", "c"]);
    assert_eq!(redis_cli(port, &["DBSIZE"]), "501");
    let threads = fs::read_dir(format!("/proc/{pid}/task")).unwrap().count();
    assert!(threads > 1, "redis runs worker threads");
    // Redis closes a client's socket a moment after the client left: an
    // established connection would (rightly) be refused.
    let t0 = std::time::Instant::now();
    while sockets(pid) > listening {
        assert!(t0.elapsed().as_secs() < 10, "redis keeps client sockets");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let img = tmp.path().join("img");
    ok(&snapshot(pid, &img, &["--kill"]));
    let pids = resume(&img, &[]);
    reaper.pids = pids;
    assert_eq!(redis_cli(port, &["DBSIZE"]), "501");
    assert_eq!(redis_cli(port, &["GET", "key377"]), "value377");
    assert_eq!(redis_cli(port, &["LRANGE", "list", "0", "-1"]), "a\nb\nc");
    assert_eq!(redis_cli(port, &["SET", "after", "resume"]), "OK");
    assert_eq!(redis_cli(port, &["INCR", "counter"]), "1");
    assert_eq!(redis_cli(port, &["GET", "after"]), "resume");
    assert_eq!(redis_cli(port, &["DBSIZE"]), "503");
}
