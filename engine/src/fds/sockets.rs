//! Sockets: unix (stream, dgram, seqpacket; by path, abstract or unnamed)
//! and TCP/UDP over IPv4 and IPv6.
//!
//! What is saved is read from a duplicate of the socket (pidfd_getfd) with
//! getsockname/getpeername/getsockopt, and for unix sockets from sock_diag
//! (the peer's inode, the queue lengths). Queued bytes are copied with
//! MSG_PEEK at a moving SO_PEEK_OFF, which leaves them in place.
//!
//! What comes back:
//! - unix sockets connected to each other inside the snapshot: a
//!   socketpair, each side's queue written back from the other side;
//! - listening sockets (unix or TCP): bound to their address again and
//!   listening (a clear error if the address is taken). Connections not
//!   accepted yet are refused at snapshot time;
//! - bound or unbound, unconnected sockets: bound again; UDP sockets
//!   connected again;
//! - established TCP: refused at snapshot time, unless `--tcp-established
//!   close`, which brings them back as connections reset by the peer.
//!
//! Refused: a unix stream connected to a process outside the snapshot,
//! queued file descriptors (SCM_RIGHTS), other families (netlink, packet...).

use super::{check, owned, take, Target};
use crate::error::{Error, Result};
use crate::image::{FileObject, ObjectKind, Socket, SocketState};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};

/// Options copied as ints: (level, name).
const OPTIONS: &[(i32, i32)] = &[
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_BROADCAST),
    (libc::SOL_SOCKET, libc::SO_PASSCRED),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
];

fn getsockopt_int(fd: i32, level: i32, name: i32) -> Option<i32> {
    let mut v: libc::c_int = 0;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: v and len are valid for the int-sized option.
    let r = unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut i32).cast(), &mut len) };
    (r == 0).then_some(v)
}

fn setsockopt_int(fd: i32, level: i32, name: i32, v: i32) -> Result<()> {
    // SAFETY: v is an int, as the option expects.
    let r = unsafe { libc::setsockopt(fd, level, name, (&v as *const i32).cast(), 4) };
    check(r as _, || format!("setsockopt({level}, {name})")).map(drop)
}

/// getsockname or getpeername as raw sockaddr bytes (empty if none).
fn name(fd: i32, peer: bool) -> Vec<u8> {
    let mut buf = [0u8; 128];
    let mut len = buf.len() as libc::socklen_t;
    let p = buf.as_mut_ptr().cast();
    // SAFETY: buf holds len bytes.
    let r = unsafe {
        if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        }
    };
    if r != 0 || len <= 2 {
        return vec![];
    }
    buf[..len as usize].to_vec()
}

pub fn dump(t: &Target, tcp_close: bool) -> Result<Socket> {
    let f = take(t)?;
    let fd = f.as_raw_fd();
    let opt = |n| getsockopt_int(fd, libc::SOL_SOCKET, n).unwrap_or(-1);
    let mut s = Socket {
        family: opt(libc::SO_DOMAIN),
        stype: opt(libc::SO_TYPE),
        protocol: opt(libc::SO_PROTOCOL),
        ino: t.link_ino(),
        local: name(fd, false),
        remote: name(fd, true),
        cwd: std::fs::read_link(format!("/proc/{}/cwd", t.pid))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ..Default::default()
    };
    for &(level, n) in OPTIONS {
        if let Some(v) = getsockopt_int(fd, level, n) {
            s.options.push((level, n, v));
        }
    }
    let listening = opt(libc::SO_ACCEPTCONN) == 1;
    match s.family {
        libc::AF_UNIX => dump_unix(t, fd, &mut s, listening)?,
        libc::AF_INET | libc::AF_INET6 => dump_inet(t, fd, &mut s, listening, tcp_close)?,
        f => {
            return Err(t.unsupported(format!(
                "is a socket of family {f} (netlink, packet...), which snapshots do not support: close it first"
            )))
        }
    }
    Ok(s)
}

fn dump_inet(t: &Target, fd: i32, s: &mut Socket, listening: bool, tcp_close: bool) -> Result<()> {
    if s.stype == libc::SOCK_STREAM {
        let info = tcp_info(fd);
        if listening {
            s.state = SocketState::Listening;
            s.backlog = info.map_or(128, |i| i.tcpi_sacked as i32);
            if info.is_some_and(|i| i.tcpi_unacked > 0) && !tcp_close {
                return Err(t.unsupported(
                    "is a listening TCP socket with connections not accepted yet: retry when the server has accepted them, or use --tcp-established close (they are dropped)",
                ));
            }
        } else if !s.remote.is_empty() || info.is_some_and(|i| i.tcpi_state != 7) {
            if !tcp_close {
                return Err(t.unsupported(format!(
                    "is an established TCP connection ({} -> {}): close it first, or snapshot with --tcp-established close (it resumes as reset)",
                    addr_text(&s.local),
                    addr_text(&s.remote)
                )));
            }
            s.state = SocketState::Reset;
        }
        return Ok(());
    }
    if inq(fd) > 0 {
        return Err(
            t.unsupported("is a UDP socket with datagrams queued: retry once they are read")
        );
    }
    if !s.remote.is_empty() {
        s.state = SocketState::Connected;
    }
    Ok(())
}

fn tcp_info(fd: i32) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers; zero is valid.
    let mut i: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: i holds len bytes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut i as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(i)
}

fn inq(fd: i32) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    n
}

/// "1.2.3.4:80" or "[::1]:80" from raw sockaddr bytes.
pub fn addr_text(raw: &[u8]) -> String {
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    let family = raw.first().map_or(-1, |&f| f as i32);
    match (family, raw.len()) {
        (libc::AF_INET, 16..) => {
            format!("{}.{}.{}.{}:{}", raw[4], raw[5], raw[6], raw[7], port(raw))
        }
        (libc::AF_INET6, 28..) => {
            let a: [u8; 16] = raw[8..24].try_into().expect("16");
            format!("[{}]:{}", std::net::Ipv6Addr::from(a), port(raw))
        }
        (libc::AF_UNIX, 3..) => {
            let p = &raw[2..];
            match p.first() {
                Some(0) => format!("@{}", String::from_utf8_lossy(&p[1..])),
                _ => String::from_utf8_lossy(p)
                    .trim_end_matches('\0')
                    .to_string(),
            }
        }
        _ => "(unnamed)".into(),
    }
}

fn dump_unix(t: &Target, fd: i32, s: &mut Socket, listening: bool) -> Result<()> {
    let diag = unix_diag(s.ino)?;
    s.shutdown = diag.shutdown as i32;
    if listening {
        s.state = SocketState::Listening;
        s.backlog = diag.wqueue as i32;
        if diag.rqueue > 0 {
            return Err(t.unsupported(format!(
                "is a listening unix socket ({}) with connections not accepted yet: retry when they are accepted",
                addr_text(&s.local)
            )));
        }
        return Ok(());
    }
    s.peer = diag.peer as u64;
    if s.peer != 0 {
        s.state = SocketState::Connected;
    }
    s.queue = peek_queue(t, fd, s.stype)?;
    Ok(())
}

/// Copies every queued message (or, for streams, bytes) without consuming
/// them: MSG_PEEK from a peek offset moved forward, then reset.
fn peek_queue(t: &Target, fd: i32, stype: i32) -> Result<Vec<Vec<u8>>> {
    if inq(fd) == 0 {
        return Ok(vec![]);
    }
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let result = loop {
        let mut cmsg = [0u64; 64];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg);
        // SAFETY: msg points at live buffers of the sizes given.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = nix::errno::Errno::last();
            break if e == nix::errno::Errno::EAGAIN {
                Ok(())
            } else {
                Err(Error::sys("peek a unix socket's queue", e))
            };
        }
        if has_rights(&msg) {
            break Err(t.unsupported(
                "is a unix socket with file descriptors in flight (SCM_RIGHTS): retry once the receiver has read them",
            ));
        }
        if n == 0 && stype == libc::SOCK_STREAM {
            break Ok(());
        }
        out.push(buf[..n as usize].to_vec());
    };
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, -1)?;
    result?;
    if stype == libc::SOCK_STREAM {
        return Ok(vec![out.concat()]);
    }
    Ok(out)
}

/// True if the peeked message carries SCM_RIGHTS (whose fds are closed here).
fn has_rights(msg: &libc::msghdr) -> bool {
    let mut found = false;
    // SAFETY: CMSG_* walk the control buffer recvmsg filled in.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                found = true;
                let data = libc::CMSG_DATA(c) as *const i32;
                let n = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..n {
                    libc::close(*data.add(i));
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    found
}

/// Inodes of the sockets the processes hold.
pub fn held(pids: &[i32]) -> Result<std::collections::HashSet<u64>> {
    let mut out = std::collections::HashSet::new();
    for &pid in pids {
        for fd in crate::proc::fds(pid)? {
            let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
            let link = link.to_string_lossy();
            if let Some(i) = link
                .strip_prefix("socket:[")
                .and_then(|r| r.trim_end_matches(']').parse().ok())
            {
                out.insert(i);
            }
        }
    }
    Ok(out)
}

/// The peer of a connected unix socket (None for other sockets).
pub fn unix_peer(ino: u64) -> Option<u64> {
    unix_diag(ino)
        .ok()
        .map(|d| d.peer as u64)
        .filter(|&p| p != 0)
}

struct UnixDiag {
    peer: u32,
    rqueue: u32,
    wqueue: u32,
    shutdown: u8,
}

/// One sock_diag request for a unix socket by inode: peer, queue lengths,
/// shutdown state.
fn unix_diag(ino: u64) -> Result<UnixDiag> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const UDIAG_SHOW_PEER: u32 = 4;
    const UDIAG_SHOW_RQLEN: u32 = 0x10;
    const UNIX_DIAG_PEER: u16 = 2;
    const UNIX_DIAG_RQLEN: u16 = 4;
    const UNIX_DIAG_SHUTDOWN: u16 = 6;
    // SAFETY: socket takes no pointers.
    let nl = owned(
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 4) },
        || "netlink sock_diag socket".into(),
    )?;
    let mut req = [0u8; 16 + 24];
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[16] = libc::AF_UNIX as u8;
    req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // all states
    req[24..28].copy_from_slice(&(ino as u32).to_ne_bytes());
    req[28..32].copy_from_slice(&(UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_ne_bytes());
    req[32..40].copy_from_slice(&[0xff; 8]); // no cookie
    nix::unistd::write(&nl, &req).map_err(|e| Error::sys("sock_diag request", e))?;
    let mut buf = [0u8; 8192];
    let n = nix::unistd::read(&nl, &mut buf).map_err(|e| Error::sys("sock_diag reply", e))?;
    let msg = &buf[..n];
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4"));
    if n < 16 || u16_at(msg, 4) == libc::NLMSG_ERROR as u16 {
        return Err(Error::Restore(format!(
            "sock_diag knows no unix socket {ino}"
        )));
    }
    let mut d = UnixDiag {
        peer: 0,
        rqueue: 0,
        wqueue: 0,
        shutdown: 0,
    };
    let end = (u32_at(msg, 0) as usize).min(n);
    let mut at = 16 + 16; // nlmsghdr + unix_diag_msg
    while at + 4 <= end {
        let len = u16_at(msg, at) as usize;
        let kind = u16_at(msg, at + 2);
        if len < 4 {
            break;
        }
        let data = &msg[at + 4..(at + len).min(end)];
        match kind {
            UNIX_DIAG_PEER if data.len() >= 4 => d.peer = u32_at(data, 0),
            UNIX_DIAG_RQLEN if data.len() >= 8 => {
                d.rqueue = u32_at(data, 0);
                d.wqueue = u32_at(data, 4);
            }
            UNIX_DIAG_SHUTDOWN if !data.is_empty() => d.shutdown = data[0],
            _ => {}
        }
        at += len.div_ceil(4) * 4;
    }
    Ok(d)
}

/// Creates every socket of the image (peers together): id -> descriptor.
pub fn create_all(objects: &[FileObject], made: &mut HashMap<u32, OwnedFd>) -> Result<()> {
    let socks: Vec<(u32, &Socket)> = objects
        .iter()
        .filter_map(|o| match &o.kind {
            ObjectKind::Socket(s) => Some((o.id, s)),
            _ => None,
        })
        .collect();
    for &(id, s) in &socks {
        if made.contains_key(&id) {
            continue;
        }
        let peer = (s.family == libc::AF_UNIX && s.peer != 0)
            .then(|| {
                socks
                    .iter()
                    .find(|(_, p)| p.ino == s.peer && p.peer == s.ino)
            })
            .flatten();
        if let Some(&(pid_, p)) = peer {
            let (a, b) = pair(s)?;
            apply_options(b.as_raw_fd(), p)?;
            refill(&b, &s.queue, s.stype)?;
            refill(&a, &p.queue, p.stype)?;
            shutdown(&a, s.shutdown)?;
            shutdown(&b, p.shutdown)?;
            made.insert(id, a);
            made.insert(pid_, b);
            continue;
        }
        if s.family == libc::AF_UNIX && s.peer == 0 && !bound(s) && !s.queue.is_empty() {
            // Its peer is gone, leaving bytes to read: a pair whose other
            // end writes them and closes (the reader then sees end of file).
            let (a, b) = pair(s)?;
            refill(&b, &s.queue, s.stype)?;
            made.insert(id, a);
            continue;
        }
        made.insert(id, single(s)?);
    }
    Ok(())
}

fn pair(s: &Socket) -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds holds two ints.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            s.stype | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    check(r as _, || "socketpair".into())?;
    let a = owned(fds[0], || "socketpair".into())?;
    let b = owned(fds[1], || "socketpair".into())?;
    apply_options(a.as_raw_fd(), s)?;
    Ok((a, b))
}

/// Writes the messages a socket had queued for reading, from its peer.
fn refill(from: &OwnedFd, queue: &[Vec<u8>], _stype: i32) -> Result<()> {
    for m in queue {
        let mut done = 0;
        while done < m.len() || m.is_empty() {
            let n = nix::unistd::write(from, &m[done..])
                .map_err(|e| Error::sys("write a socket's queued data back", e))?;
            done += n;
            if m.is_empty() {
                break;
            }
        }
    }
    Ok(())
}

fn shutdown(fd: &OwnedFd, how: i32) -> Result<()> {
    let h = match how & 3 {
        0 => return Ok(()),
        1 => libc::SHUT_RD,
        2 => libc::SHUT_WR,
        _ => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown takes integers.
    check(unsafe { libc::shutdown(fd.as_raw_fd(), h) } as _, || {
        "shutdown".into()
    })
    .map(drop)
}

fn apply_options(fd: i32, s: &Socket) -> Result<()> {
    for &(level, n, v) in &s.options {
        if level == libc::IPPROTO_TCP && s.stype != libc::SOCK_STREAM {
            continue;
        }
        if v != 0 || n == libc::IPV6_V6ONLY {
            setsockopt_int(fd, level, n, v)?;
        }
    }
    Ok(())
}

/// A socket with no peer inside the snapshot: bound, listening or
/// connected again as it was.
fn single(s: &Socket) -> Result<OwnedFd> {
    if s.state == SocketState::Reset {
        return reset_tcp(s);
    }
    if s.family == libc::AF_UNIX && s.state == SocketState::Connected && s.stype != libc::SOCK_DGRAM
    {
        return Err(Error::Restore(format!(
            "unix socket {} was connected to a process outside the snapshot; snapshot that process too (--tree from a common ancestor)",
            addr_text(&s.local)
        )));
    }
    // SAFETY: socket takes no pointers.
    let fd = owned(
        unsafe { libc::socket(s.family, s.stype | libc::SOCK_CLOEXEC, s.protocol) },
        || format!("socket({}, {})", s.family, s.stype),
    )?;
    apply_options(fd.as_raw_fd(), s)?;
    if bound(s) {
        in_owner_dir(s, || bind(&fd, s))?;
    }
    if s.state == SocketState::Listening {
        // SAFETY: listen takes integers.
        let r = unsafe { libc::listen(fd.as_raw_fd(), s.backlog.max(1)) };
        check(r as _, || format!("listen on {}", addr_text(&s.local)))?;
    }
    if s.family == libc::AF_UNIX && bound(s) && !s.queue.is_empty() {
        in_owner_dir(s, || requeue(s))?;
    }
    if s.state == SocketState::Connected && !s.remote.is_empty() {
        // SAFETY: remote holds a sockaddr of its length.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                s.remote.as_ptr().cast(),
                s.remote.len() as libc::socklen_t,
            )
        };
        check(r as _, || format!("connect to {}", addr_text(&s.remote)))?;
    }
    Ok(fd)
}

/// Runs `f` in the socket owner's working directory when the socket's
/// path is relative, so that the process still sees the name it bound.
fn in_owner_dir<T>(s: &Socket, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let relative = s.family == libc::AF_UNIX
        && s.local.get(2).is_some_and(|&b| b != 0 && b != b'/')
        && !s.cwd.is_empty();
    if !relative {
        return f();
    }
    let back = std::env::current_dir().map_err(|e| Error::io("getcwd", e))?;
    std::env::set_current_dir(&s.cwd).map_err(|e| Error::io(format!("chdir {}", s.cwd), e))?;
    let r = f();
    let _ = std::env::set_current_dir(back);
    r
}

/// Sends a bound datagram socket's queued messages to it again.
fn requeue(s: &Socket) -> Result<()> {
    // Datagrams others sent to this address: send them again.
    let from = std::os::unix::net::UnixDatagram::unbound()
        .map_err(|e| Error::io("make a unix datagram socket", e))?;
    for m in &s.queue {
        // SAFETY: local holds a sockaddr of its length; m is a live buffer.
        let r = unsafe {
            libc::sendto(
                from.as_raw_fd(),
                m.as_ptr().cast(),
                m.len(),
                0,
                s.local.as_ptr().cast(),
                s.local.len() as libc::socklen_t,
            )
        };
        check(r as _, || {
            format!("requeue a datagram to {}", addr_text(&s.local))
        })?;
    }
    Ok(())
}

/// Was the socket bound to an address of its own (not the unspecified one)?
fn bound(s: &Socket) -> bool {
    match s.family {
        libc::AF_UNIX => s.local.len() > 2,
        // A port of 0 means never bound (or autobound at connect).
        _ => s.local.len() >= 4 && (s.local[2] != 0 || s.local[3] != 0),
    }
}

fn bind(fd: &OwnedFd, s: &Socket) -> Result<()> {
    let path_socket = s.family == libc::AF_UNIX && s.local.get(2).is_some_and(|&b| b != 0);
    if path_socket {
        remove_stale_socket(&s.local);
    }
    // A process killed by `snapshot --kill` may still be closing its
    // sockets: retry a taken address for up to two seconds.
    let t0 = std::time::Instant::now();
    let e = loop {
        // SAFETY: local holds a sockaddr of its length.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                s.local.as_ptr().cast(),
                s.local.len() as libc::socklen_t,
            )
        };
        let e = nix::errno::Errno::last();
        if r == 0 {
            return Ok(());
        }
        if e != nix::errno::Errno::EADDRINUSE || t0.elapsed() > std::time::Duration::from_secs(2) {
            break e;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let addr = addr_text(&s.local);
    if e != nix::errno::Errno::EADDRINUSE {
        return Err(Error::sys(format!("bind {addr}"), e));
    }
    let tcp = s.family != libc::AF_UNIX && s.stype == libc::SOCK_STREAM;
    if tcp && !tcp_listener_on(port(&s.local)) {
        return Err(Error::Restore(format!(
            "address {addr} is held by closed connections of the snapshotted process (TIME_WAIT), and the program did not set SO_REUSEADDR: resume again in a minute"
        )));
    }
    Err(Error::AddressInUse(addr))
}

fn port(raw: &[u8]) -> u16 {
    u16::from_be_bytes([raw[2], raw[3]])
}

/// Is some TCP socket of this host listening on `port` (any address)?
fn tcp_listener_on(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let mut cols = l.split_whitespace().skip(1);
                let local = cols.next().unwrap_or("");
                let state = cols.nth(1).unwrap_or("");
                state == "0A"
                    && local
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
    })
}

/// A unix socket's file outlives its process; one nobody listens on any
/// more is removed so that the address can be bound again.
fn remove_stale_socket(raw: &[u8]) {
    use std::os::unix::fs::FileTypeExt;
    let path = addr_text(raw);
    let is_socket = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket && std::os::unix::net::UnixStream::connect(&path).is_err() {
        let _ = std::fs::remove_file(&path);
    }
}

/// A TCP socket whose connection was reset by its peer: connect to a
/// throwaway listener on loopback, which aborts the connection (linger 0).
fn reset_tcp(s: &Socket) -> Result<OwnedFd> {
    let v6 = s.family == libc::AF_INET6;
    let listener = if v6 {
        std::net::TcpListener::bind("[::1]:0")
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
    }
    .map_err(|e| Error::io("listen on loopback (to recreate a reset connection)", e))?;
    let client = std::net::TcpStream::connect(listener.local_addr().expect("bound"))
        .map_err(|e| Error::io("connect on loopback", e))?;
    let (server, _) = listener
        .accept()
        .map_err(|e| Error::io("accept on loopback", e))?;
    let lin = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: lin is a valid linger struct.
    unsafe {
        libc::setsockopt(
            server.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&lin as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    drop(server);
    std::thread::sleep(std::time::Duration::from_millis(1));
    let fd = OwnedFd::from(client);
    apply_options(fd.as_raw_fd(), s)?;
    Ok(fd)
}
