//! FUSE over io_uring (Linux 6.14 and later). Added to this copy of fuser by
//! the umlctl project; see PATCHES.md.
//!
//! With `/dev/fuse`, a request wakes whichever daemon thread has waited
//! longest, on whatever CPU it last ran, and the reply wakes the caller back
//! across CPUs. On a virtual machine whose idle CPUs halt, each such wakeup
//! costs tens of microseconds, more than the work of a `stat`. The kernel's
//! io_uring transport keeps one queue per CPU: a request made on CPU n goes
//! to a thread waiting on queue n, which this module pins to CPU n, so a
//! request and its reply stay on one CPU.
//!
//! Per queue of an online CPU, [`THREADS_PER_QUEUE`] threads (one for a
//! CPU that is possible but offline) each own an io_uring with one ring
//! entry: a header buffer and a payload buffer that the kernel fills
//! with a request and reads the reply from.
//!
//! ```text
//!   REGISTER ──► the kernel puts a request in the entry ──► CQE
//!      ▲                                                     │
//!      └─ COMMIT_AND_FETCH (the reply is in the entry) ◄── dispatch
//! ```
//!
//! Interrupts, forgets and notifications still go through `/dev/fuse`, so
//! the session's usual threads keep running beside these.

use std::alloc::Layout;
use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue::Entry128;
use io_uring::types;
use log::error;
use log::warn;

use crate::Filesystem;
use crate::ReplyEmpty;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::passthrough::BackingId;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// Threads, each with one ring entry, per queue of an online CPU, unless
/// `Config::ring_threads` says otherwise. Each serves one request at a
/// time, while the kernel hands a CPU's writeback several at once and a
/// slow one (an fsync) must not hold up the rest: with 2, sequential
/// writes ran ~20% slower than over /dev/fuse with 4 threads; with 4, as
/// fast.
pub(crate) const THREADS_PER_QUEUE: usize = 4;

// The kernel's interface, from include/uapi/linux/fuse.h.
/// How long `Rings::start` waits for the ring threads to register.
const REGISTER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_uring_req_header`: `in_out[128]`, `op_in[128]`, then
/// `struct fuse_uring_ent_in_out { flags, commit_id, payload_sz, .. }`.
const HEADER_LEN: usize = 288;
const OP_IN: usize = 128;
const OP_IN_MAX: usize = 128;
const COMMIT_ID: usize = 264;
const PAYLOAD_SZ: usize = 272;
/// `struct fuse_in_header` and `struct fuse_out_header`.
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
const FUSE_FORGET: u32 = 2;
const FUSE_WRITE: u32 = 16;
/// Room before the payload for the headers, so that a WRITE's data is
/// handed to the file system where the kernel put it (see `Worker::run`).
const SLACK: usize = 4096;
const FUSE_BATCH_FORGET: u32 = 42;

const ENTRY: u64 = 1;
const STOP: u64 = 2;

/// Whether the kernel offers the transport: it must be built in and turned
/// on (`/sys/module/fuse/parameters/enable_uring`).
pub fn available() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|s| s.trim() == "Y")
}

/// The ring threads of a session, and the way to stop them.
pub(crate) struct Rings {
    threads: Vec<JoinHandle<()>>,
    stop: std::fs::File,
}

impl Rings {
    /// Registers ring entries for every possible CPU and serves them;
    /// returns once each thread has registered its entry (or failed, or
    /// `REGISTER_WAIT` passed).
    pub(crate) fn start<FS: Filesystem>(
        make_loop: impl Fn(String) -> SessionEventLoop<FS>,
        payload_len: usize,
        per_online_cpu: Option<usize>,
    ) -> io::Result<Rings> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is ours and open.
        let stop: std::fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(efd) };
        let mut rings = Rings {
            threads: Vec::new(),
            stop,
        };
        let (registered, rx) = std::sync::mpsc::channel();
        let per_online_cpu = per_online_cpu.unwrap_or(THREADS_PER_QUEUE).max(1);
        let spawned = queue_threads(per_online_cpu)
            .and_then(|plan| rings.spawn(make_loop, &plan, payload_len, efd, registered));
        if let Err(e) = spawned {
            rings.stop();
            return Err(e);
        }
        let deadline = std::time::Instant::now() + REGISTER_WAIT;
        for _ in 0..rings.threads.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if rx.recv_timeout(left).is_err() {
                break;
            }
        }
        Ok(rings)
    }

    fn spawn<FS: Filesystem>(
        &mut self,
        make_loop: impl Fn(String) -> SessionEventLoop<FS>,
        plan: &[usize],
        payload_len: usize,
        stop_fd: RawFd,
        registered: Sender<()>,
    ) -> io::Result<()> {
        for (qid, &threads) in plan.iter().enumerate() {
            let qid = qid as u16;
            for k in 0..threads {
                let name = format!("fuser-ring-{qid}.{k}");
                let se = make_loop(name.clone());
                let ring = Worker::new(qid, payload_len, stop_fd)?;
                let registered = registered.clone();
                let t = std::thread::Builder::new()
                    .name(name)
                    .spawn(move || ring.serve(se, registered))?;
                self.threads.push(t);
            }
        }
        Ok(())
    }

    /// Ends every ring thread (after the kernel ended the connection, their
    /// entries are cancelled with the rings) and waits for them.
    pub(crate) fn stop(self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        let _ = unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), 8) };
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// The number of ring threads of each queue (one queue per possible CPU,
/// indexed by CPU number): the kernel needs an entry on every queue
/// before it uses any, but only an online CPU sends requests, so a CPU
/// that is possible but offline gets one thread (enough if it comes
/// online later), and an online one `per_online_cpu`.
fn queue_threads(per_online_cpu: usize) -> io::Result<Vec<usize>> {
    let read = |name| std::fs::read_to_string(format!("/sys/devices/system/cpu/{name}"));
    let possible = cpu_list(&read("possible")?)?;
    let online = cpu_list(&read("online")?)?;
    let queues = possible.iter().max().map_or(0, |&m| m as usize + 1);
    Ok((0..queues)
        .map(|q| {
            if online.contains(&(q as u16)) {
                per_online_cpu
            } else {
                1
            }
        })
        .collect())
}

/// The CPUs of a kernel CPU list such as "0-3,8,10-11".
fn cpu_list(text: &str) -> io::Result<Vec<u16>> {
    let bad = || io::Error::other(format!("cannot read CPU list {text:?}"));
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let first: u16 = first.parse().map_err(|_| bad())?;
        let last: u16 = last.parse().map_err(|_| bad())?;
        if first > last {
            return Err(bad());
        }
        cpus.extend(first..=last);
    }
    Ok(cpus)
}

fn pin_to_cpu(cpu: u16) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity
    // only touch it and this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            // An offline CPU: the queue still needs its entries.
            warn!("cannot pin ring thread to CPU {cpu}");
        }
    }
}

/// Page-aligned memory that the kernel reads and writes through the ring.
struct PageBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory; who touches it when is ruled by the ring protocol
// (the kernel between submission and completion, else one request's thread).
unsafe impl Send for PageBuf {}
unsafe impl Sync for PageBuf {}

impl PageBuf {
    fn new(len: usize) -> io::Result<PageBuf> {
        let layout = Layout::from_size_align(len, 4096).map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(PageBuf { ptr, len })
    }

    fn read(&self, at: usize, out: &mut [u8]) {
        assert!(at + out.len() <= self.len);
        // SAFETY: in bounds (checked); the kernel is not writing now.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(at), out.as_mut_ptr(), out.len())
        }
    }

    fn write(&self, at: usize, data: &[u8]) {
        assert!(at + data.len() <= self.len);
        // SAFETY: in bounds (checked); the kernel is not reading now.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(at), data.len())
        }
    }

    fn u32_at(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(at, &mut b);
        u32::from_ne_bytes(b)
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, 4096).expect("checked in new");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// One ring entry's buffers, shared by its thread and the reply.
struct Entry {
    header: PageBuf,
    /// `SLACK` bytes, then the payload the kernel reads and writes.
    data: PageBuf,
    payload_len: usize,
    state: Mutex<Reply>,
    done: Condvar,
}

/// Whether the reply is in, and whether the entry's thread sleeps on it
/// (only then does the reply wake it: most replies come from that thread,
/// and a futex wake per request is measurable).
#[derive(Default)]
struct Reply {
    sent: bool,
    waiting: bool,
    /// Keep the reply aside (`held`) rather than write it in the entry:
    /// the request being served still reads the payload.
    hold: bool,
    held: Option<Vec<u8>>,
}

impl Entry {
    /// Puts a reply in the entry: the out header in the header buffer, the
    /// rest in the payload, wherever the slices happen to split. A reply
    /// too big for the entry becomes an EIO, since the kernel waits for one.
    fn put<S: std::ops::Deref<Target = [u8]>>(&self, data: &[S]) -> io::Result<()> {
        let total: usize = data.iter().map(|s| s.len()).sum();
        if total < OUT_HEADER_LEN || total - OUT_HEADER_LEN > self.payload_len {
            error!("reply of {total} bytes does not fit a ring entry");
            if let Some(head) = data.first().filter(|s| s.len() >= OUT_HEADER_LEN) {
                self.header.write(0, &head[..OUT_HEADER_LEN]);
            }
            self.header.write(4, &(-libc::EIO).to_ne_bytes());
            self.header.write(PAYLOAD_SZ, &0u32.to_ne_bytes());
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut at = 0;
        for s in data {
            let head = OUT_HEADER_LEN.saturating_sub(at).min(s.len());
            self.header.write(at.min(OUT_HEADER_LEN), &s[..head]);
            let to = SLACK + (at + head).saturating_sub(OUT_HEADER_LEN);
            self.data.write(to, &s[head..]);
            at += s.len();
        }
        let payload = (total - OUT_HEADER_LEN) as u32;
        self.header.write(PAYLOAD_SZ, &payload.to_ne_bytes());
        Ok(())
    }
}

/// Sends a reply into a ring entry; the entry's thread commits it.
#[derive(Clone)]
pub(crate) struct RingSender {
    entry: Arc<Entry>,
    ch: ChannelSender,
}

impl std::fmt::Debug for RingSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingSender")
    }
}

impl RingSender {
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let e = &self.entry;
        let mut state = e.state.lock().unwrap_or_else(|p| p.into_inner());
        let result = if state.hold {
            state.held = Some(data.iter().flat_map(|s| s.iter().copied()).collect());
            Ok(())
        } else {
            e.put(data)
        };
        state.sent = true;
        if state.waiting {
            e.done.notify_one();
        }
        result
    }

    pub(crate) fn open_backing(&self, fd: BorrowedFd<'_>) -> io::Result<BackingId> {
        self.ch.open_backing(fd)
    }

    pub(crate) unsafe fn wrap_backing(&self, id: u32) -> BackingId {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.ch.wrap_backing(id) }
    }
}

/// One thread's ring and its entry.
struct Worker {
    qid: u16,
    ring: IoUring<Entry128, cqueue::Entry>,
    entry: Arc<Entry>,
    /// Where REGISTER tells the kernel the buffers are; boxed so that the
    /// address stays put while the command is in flight.
    iov: Box<[libc::iovec; 2]>,
    stop_fd: RawFd,
}

// SAFETY: the iovecs point into `entry`, which the worker owns and moves
// with it; nothing else reads them.
unsafe impl Send for Worker {}

impl Worker {
    fn new(qid: u16, payload_len: usize, stop_fd: RawFd) -> io::Result<Worker> {
        let entry = Arc::new(Entry {
            header: PageBuf::new(4096)?,
            data: PageBuf::new(SLACK + payload_len)?,
            payload_len,
            state: Mutex::default(),
            done: Condvar::new(),
        });
        let iov = Box::new([
            libc::iovec {
                iov_base: entry.header.ptr.as_ptr().cast(),
                iov_len: HEADER_LEN,
            },
            libc::iovec {
                // SAFETY: within the buffer (SLACK + payload_len long).
                iov_base: unsafe { entry.data.ptr.as_ptr().add(SLACK).cast() },
                iov_len: payload_len,
            },
        ]);
        Ok(Worker {
            qid,
            ring: IoUring::builder().build(4)?,
            entry,
            iov,
            stop_fd,
        })
    }

    /// A uring command for the queue: REGISTER (with the buffers) or
    /// COMMIT_AND_FETCH (naming the request answered).
    fn command(&self, fd: RawFd, op: u32, commit_id: u64) -> Entry128 {
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let addr = (op == CMD_REGISTER).then(|| self.iov.as_ptr() as u64);
        let mut sqe = opcode::UringCmd80::new(types::Fd(fd), op)
            .cmd(cmd)
            .addr(addr)
            .build()
            .user_data(ENTRY);
        if op == CMD_REGISTER {
            // io-uring's builder has no `len` for URING_CMD, and REGISTER
            // needs it: the number of iovecs.
            // SAFETY: Entry128 is repr(C), 128 bytes: an io_uring_sqe,
            // whose `len` is the u32 at byte 24, then 64 bytes of command.
            let bytes = unsafe { &mut *(&raw mut sqe).cast::<[u8; 128]>() };
            bytes[24..28].copy_from_slice(&2u32.to_ne_bytes());
        }
        sqe
    }

    fn push(&mut self, sqe: &Entry128) -> io::Result<()> {
        // SAFETY: the buffers the command names (iov, entry) live as long
        // as the worker, which outlives the ring's commands.
        unsafe { self.ring.submission().push(sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    fn serve<FS: Filesystem>(mut self, se: SessionEventLoop<FS>, registered: Sender<()>) {
        pin_to_cpu(self.qid);
        if let Err(e) = self.run(&se, registered) {
            error!("{}: {e}", se.thread_name);
        }
    }

    fn run<FS: Filesystem>(
        &mut self,
        se: &SessionEventLoop<FS>,
        registered: Sender<()>,
    ) -> io::Result<()> {
        let fd = se.ch.as_fd().as_raw_fd();
        let stop = opcode::PollAdd::new(types::Fd(self.stop_fd), libc::POLLIN as u32)
            .build()
            .user_data(STOP);
        self.push(&Entry128::from(stop))?;
        let mut last = self.command(fd, CMD_REGISTER, 0);
        self.push(&last)?;
        // The kernel registers the entry while the command is submitted.
        self.ring.submit()?;
        let _ = registered.send(());
        drop(registered);
        let mut request = Vec::with_capacity(IN_HEADER_LEN + OP_IN_MAX + self.entry.payload_len);
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            let Some(cqe) = self.ring.completion().next() else {
                continue;
            };
            if cqe.user_data() == STOP {
                return Ok(());
            }
            match -cqe.result() {
                0 => {}
                libc::EINTR | libc::EAGAIN => {
                    self.push(&last)?;
                    continue;
                }
                // The connection ended.
                libc::ENOTCONN | libc::ENODEV | libc::ECANCELED => return Ok(()),
                errno => return Err(io::Error::from_raw_os_error(errno)),
            }
            let (commit_id, sizes) = self.sizes();
            let e = &self.entry;
            let held = match sizes {
                Ok((len, op_in)) => self.serve_request(se, &mut request, len, op_in),
                Err(err) => {
                    // The kernel waits for an answer whatever the request.
                    error!("{}: {err}", se.thread_name);
                    let mut reply = [0u8; OUT_HEADER_LEN];
                    reply[..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
                    reply[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
                    e.header.read(8, &mut reply[8..16]);
                    Some(reply.to_vec())
                }
            };
            if let Some(reply) = held {
                let _ = self.entry.put(&[reply.as_slice()]);
            }
            last = self.command(fd, CMD_COMMIT_AND_FETCH, commit_id);
            self.push(&last)?;
        }
    }

    /// Serves the request in the entry; returns the reply if it was held.
    fn serve_request<FS: Filesystem>(
        &self,
        se: &SessionEventLoop<FS>,
        request: &mut Vec<u8>,
        len: usize,
        op_in: usize,
    ) -> Option<Vec<u8>> {
        let e = &self.entry;
        if e.header.u32_at(4) == FUSE_WRITE {
            // A WRITE's data stays where the kernel put it: its headers
            // go in the slack just before, and the reply is held until
            // the request is done with.
            let start = SLACK - IN_HEADER_LEN - op_in;
            let mut head = [0u8; IN_HEADER_LEN + OP_IN_MAX];
            e.header.read(0, &mut head[..IN_HEADER_LEN]);
            e.header
                .read(OP_IN, &mut head[IN_HEADER_LEN..IN_HEADER_LEN + op_in]);
            e.data.write(start, &head[..IN_HEADER_LEN + op_in]);
            // SAFETY: `len` bytes from `start` lie in the buffer (checked
            // by `sizes`) and were written by us and the kernel, and
            // nothing writes them while the slice lives: the kernel
            // waits for our commit, and the reply is held.
            let request =
                unsafe { std::slice::from_raw_parts(e.data.ptr.as_ptr().add(start), len) };
            self.dispatch(se, request, true)
        } else {
            self.copy_request(request, len, op_in);
            self.dispatch(se, request, false)
        }
    }

    /// The request's commit id, and its length and operation header
    /// length if they make sense.
    fn sizes(&self) -> (u64, io::Result<(usize, usize)>) {
        let e = &self.entry;
        let mut id = [0u8; 8];
        e.header.read(COMMIT_ID, &mut id);
        let len = e.header.u32_at(0) as usize;
        let payload = e.header.u32_at(PAYLOAD_SZ) as usize;
        let op_in = len
            .checked_sub(IN_HEADER_LEN + payload)
            .filter(|&n| n <= OP_IN_MAX && payload <= e.payload_len)
            .map(|op_in| (len, op_in))
            .ok_or_else(|| {
                io::Error::other(format!("bad ring request: len {len}, payload {payload}"))
            });
        (u64::from_ne_bytes(id), op_in)
    }

    /// Lays the entry's request out as `/dev/fuse` would deliver it: the
    /// in header, the operation's header, then the payload.
    fn copy_request(&self, out: &mut Vec<u8>, len: usize, op_in: usize) {
        let e = &self.entry;
        out.resize(len, 0);
        e.header.read(0, &mut out[..IN_HEADER_LEN]);
        e.header
            .read(OP_IN, &mut out[IN_HEADER_LEN..IN_HEADER_LEN + op_in]);
        e.data.read(SLACK, &mut out[IN_HEADER_LEN + op_in..]);
    }

    /// Hands the request to the file system and waits for its reply (which
    /// it may send from another thread); returns the reply if `hold`.
    fn dispatch<FS: Filesystem>(
        &self,
        se: &SessionEventLoop<FS>,
        request: &[u8],
        hold: bool,
    ) -> Option<Vec<u8>> {
        let e = &self.entry;
        *e.state.lock().unwrap_or_else(|p| p.into_inner()) = Reply {
            hold,
            ..Reply::default()
        };
        let opcode = u32::from_ne_bytes(request[4..8].try_into().expect("4 bytes"));
        let sender = RingSender {
            entry: e.clone(),
            ch: se.ch.sender(),
        };
        match RequestWithSender::new_ring(se.ch.sender(), sender.clone(), request) {
            Some(req) => {
                if let Ok(Operation::Destroy(_)) = req.request.operation() {
                    req.reply::<ReplyEmpty>().ok();
                } else {
                    req.dispatch(se);
                }
            }
            None => {
                // Unreadable: answer EIO, as the kernel waits for an answer.
                let mut header = [0u8; OUT_HEADER_LEN];
                header[..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
                header[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
                header[8..16].copy_from_slice(&request[8..16]);
                let _ = sender.send(&[IoSlice::new(&header)]);
            }
        }
        if matches!(opcode, FUSE_FORGET | FUSE_BATCH_FORGET) {
            // No reply is due (these come through /dev/fuse anyway).
            return None;
        }
        let mut state = e.state.lock().unwrap_or_else(|p| p.into_inner());
        while !state.sent {
            state.waiting = true;
            state = e.done.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.held.take()
    }
}
