//! UML's management console, spoken natively. The kernel listens on a unix
//! datagram socket (`UMID_DIR/mconsole`); a request is one datagram
//!
//! ```text
//! struct mconsole_request { u32 magic = 0xcafebabe; u32 version = 2; u32 len; char data[512]; }
//! ```
//!
//! and the answer comes back to the sender's address as one or more
//! datagrams `struct mconsole_reply { u32 err; u32 more; u32 len; char data[512]; }`
//! (all host-endian; `more` is set on every part but the last). Commands we
//! use: `stop` (freeze the whole VM), `go` (thaw), `cad` (ctrl-alt-del, which
//! our inittab turns into a clean poweroff), `halt`, `version`.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const MAGIC: u32 = 0xcafe_babe;
const VERSION: u32 = 2;
const DATA_LEN: usize = 512;

/// Encodes one request datagram.
fn request(command: &str) -> std::io::Result<Vec<u8>> {
    if command.len() >= DATA_LEN {
        return Err(std::io::Error::other("mconsole command too long"));
    }
    let mut buf = Vec::with_capacity(12 + DATA_LEN);
    buf.extend_from_slice(&MAGIC.to_ne_bytes());
    buf.extend_from_slice(&VERSION.to_ne_bytes());
    buf.extend_from_slice(&(command.len() as u32).to_ne_bytes());
    let mut data = [0u8; DATA_LEN];
    data[..command.len()].copy_from_slice(command.as_bytes());
    buf.extend_from_slice(&data);
    Ok(buf)
}

/// One decoded reply datagram: (err, more, text).
fn parse_reply(d: &[u8]) -> std::io::Result<(u32, bool, String)> {
    let word = |i: usize| {
        d.get(i * 4..i * 4 + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    };
    match (word(0), word(1), word(2)) {
        (Some(err), Some(more), Some(len)) => {
            let end = (12 + len as usize).min(d.len());
            let text = String::from_utf8_lossy(&d[12..end])
                .trim_end_matches('\0')
                .to_string();
            Ok((err, more != 0, text))
        }
        _ => Err(std::io::Error::other("short mconsole reply")),
    }
}

/// Sends `command` to the mconsole socket and returns UML's answer, or an
/// error carrying UML's message when it reports one.
pub fn call(socket: &Path, command: &str) -> std::io::Result<String> {
    // The reply goes to our address, so we need one. A path beside the
    // server's socket (not an abstract name) also works when UML runs in
    // another network namespace.
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let ours: PathBuf = socket.with_file_name(format!(
        "mc-client-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&ours);
    let sock = UnixDatagram::bind(&ours)?;
    let result = exchange(&sock, socket, command);
    let _ = std::fs::remove_file(&ours);
    result
}

fn exchange(sock: &UnixDatagram, socket: &Path, command: &str) -> std::io::Result<String> {
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    sock.send_to(&request(command)?, socket)?;
    let mut text = String::new();
    let mut buf = [0u8; 12 + DATA_LEN];
    loop {
        let n = sock.recv(&mut buf)?;
        let (err, more, part) = parse_reply(&buf[..n])?;
        text.push_str(&part);
        if err != 0 {
            return Err(std::io::Error::other(format!("mconsole {command}: {text}")));
        }
        if !more {
            return Ok(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let r = request("version").unwrap();
        assert_eq!(r.len(), 12 + 512);
        assert_eq!(&r[0..4], &0xcafebabe_u32.to_ne_bytes());
        assert_eq!(&r[4..8], &2u32.to_ne_bytes());
        assert_eq!(&r[8..12], &7u32.to_ne_bytes());
        assert_eq!(&r[12..19], b"version");
        assert!(request(&"x".repeat(600)).is_err());
    }

    #[test]
    fn reply_parts() {
        let mut d = vec![];
        for w in [0u32, 1, 2] {
            d.extend_from_slice(&w.to_ne_bytes());
        }
        d.extend_from_slice(b"OK\0\0");
        assert_eq!(parse_reply(&d).unwrap(), (0, true, "OK".to_string()));
        assert!(parse_reply(&d[..8]).is_err());
    }

    /// A fake server on a real socket: checks what we send and answers in two parts.
    #[test]
    fn round_trip_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let server_path = dir.path().join("mconsole");
        let server = UnixDatagram::bind(&server_path).unwrap();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            assert_eq!(n, 524);
            assert_eq!(&buf[12..16], b"halt");
            let from = from.as_pathname().unwrap().to_path_buf();
            for (more, text) in [(1u32, "part1 "), (0, "part2")] {
                let mut r = vec![];
                for w in [0u32, more, text.len() as u32] {
                    r.extend_from_slice(&w.to_ne_bytes());
                }
                r.extend_from_slice(text.as_bytes());
                server.send_to(&r, &from).unwrap();
            }
        });
        assert_eq!(call(&server_path, "halt").unwrap(), "part1 part2");
        t.join().unwrap();
        // The client's own socket file is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
