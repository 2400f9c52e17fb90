//! The host-only VM network: guests reach each other and the host, and a
//! UDP echo and a TCP (HTTP) service in a guest answer the host. All traffic
//! stays inside this machine: a bridge in a network namespace of umlctl's,
//! joined to the host by one veth pair.

#[path = "common/mod.rs"]
mod common;
#[path = "vm_support.rs"]
mod vm_support;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;
use vm_support::Lab;

const START_SCRIPT: &str = "#!/bin/sh
mkdir -p /www
echo \"hello from $(hostname)\" > /www/index.html
httpd -p 80 -h /www
/usr/bin/udp-echo 7 &
";

/// Builds the static UDP echo server (the guest has no C library).
fn build_udp_echo(dir: &Path) -> Option<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/uml/udp-echo.c");
    let bin = dir.join("udp-echo");
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success());
    built.then(|| bin.to_string_lossy().into_owned())
}

#[test]
fn guests_serve_the_host_and_each_other() {
    if common::skip_unless(
        vm_support::uml_ready(),
        "root and a UML kernel (run tools/install-uml)",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(echo) = build_udp_echo(tmp.path()) else {
        common::skip_unless(
            false,
            "gcc with static glibc (build-essential) for the guest's UDP echo",
        );
        return;
    };
    let start = tmp.path().join("start");
    std::fs::write(&start, START_SCRIPT).unwrap();
    std::fs::set_permissions(&start, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let Some(lab) = Lab::new(&[
        format!("{echo}:/usr/bin/udp-echo"),
        format!("{}:/etc/umlctl/start", start.display()),
    ]) else {
        return;
    };
    lab.boot("n1", &["--net", "--ip", "10.213.0.201"]);
    lab.boot("n2", &["--net", "--ip", "10.213.0.202"]);
    assert_eq!(lab.vm_info("n1")["ip"], "10.213.0.201");

    // TCP from the host to a guest's HTTP server.
    assert_eq!(http_get("10.213.0.201"), "hello from n1\n");
    assert_eq!(http_get("10.213.0.202"), "hello from n2\n");
    // UDP echo from the host.
    assert_eq!(udp_echo("10.213.0.202", b"ping over udp"), b"ping over udp");
    // Guest to guest, and guest to host.
    let (rc, page) = lab.sh("n1", "wget -q -O - http://10.213.0.202/");
    assert_eq!((rc, page.as_str()), (0, "hello from n2\n"));
    assert_eq!(lab.sh("n2", "ping -c 1 -W 5 10.213.0.1").0, 0);
    // No way out: the guests have no default route.
    assert!(!lab.sh("n1", "ip route").1.contains("default"));

    lab.ok(&["vm", "stop", "n1"]);
    lab.ok(&["vm", "stop", "n2"]);
    // The last VM to stop takes the network with it.
    assert!(
        !Path::new("/run/netns/umlctl").exists(),
        "network namespace left behind"
    );
    assert!(
        !Path::new("/sys/class/net/umlctl0").exists(),
        "host veth left behind"
    );
}

/// The guest's httpd starts with its start script, which may still be
/// running when the VM answers `vm exec`: a refused connection is retried
/// for a few seconds.
fn http_get(ip: &str) -> String {
    let addr = format!("{ip}:80").parse().unwrap();
    let t0 = std::time::Instant::now();
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => break s,
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && t0.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("connect {ip}:80: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.") && reply.contains(" 200 "),
        "{reply}"
    );
    reply
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// Sends a datagram and waits for the echo, retrying a few times.
fn udp_echo(ip: &str, msg: &[u8]) -> Vec<u8> {
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    for _ in 0..10 {
        sock.send_to(msg, format!("{ip}:7")).unwrap();
        let mut buf = [0u8; 2048];
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            assert_eq!(from.ip().to_string(), ip);
            return buf[..n].to_vec();
        }
    }
    panic!("no UDP echo from {ip}:7");
}
