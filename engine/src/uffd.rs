//! userfaultfd, spoken directly through ioctls.
//!
//! Written by hand (not the userfaultfd crate) because we act on
//! descriptors that were created inside another process and taken with
//! pidfd_getfd, and use features the crate lacks (WP_ASYNC, WP_UNPOPULATED);
//! its -sys crate would also need libclang at build time. The structs and
//! numbers mirror linux/userfaultfd.h.

use crate::error::{Error, Result};
use nix::errno::Errno;
use std::os::fd::{AsRawFd, OwnedFd};

pub const UFFD_API: u64 = 0xAA;

pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

pub const MODE_MISSING: u64 = 1;
pub const MODE_WP: u64 = 2;

pub const EVENT_PAGEFAULT: u8 = 0x12;
pub const EVENT_FORK: u8 = 0x13;
pub const EVENT_REMAP: u8 = 0x14;
pub const EVENT_REMOVE: u8 = 0x15;
pub const EVENT_UNMAP: u8 = 0x16;

pub const PAGEFAULT_FLAG_WRITE: u64 = 1;
pub const PAGEFAULT_FLAG_WP: u64 = 2;

const WRITEPROTECT_MODE_WP: u64 = 1;

/// _IOWR/_IOR(0xAA, nr, size) as the kernel computes them.
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAA << 8) | nr
}
const IOC_RW: u64 = 3;
const IOC_R: u64 = 2;
const UFFDIO_API: u64 = ioc(IOC_RW, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(IOC_RW, 0x00, 32);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_R, 0x01, 16);
const UFFDIO_WAKE: u64 = ioc(IOC_R, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(IOC_RW, 0x03, 40);
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_RW, 0x04, 32);
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_RW, 0x06, 24);

/// One message read from a userfaultfd (struct uffd_msg, 32 bytes).
#[derive(Clone, Copy, Debug)]
pub struct Msg {
    pub event: u8,
    /// The event's three u64 arguments (pagefault: flags, address, ptid;
    /// fork: ufd; remap: from, to, len; remove/unmap: start, end).
    pub arg: [u64; 3],
}

/// A userfaultfd we hold.
pub struct Uffd {
    pub fd: OwnedFd,
}

fn ioctl<T>(fd: i32, req: u64, arg: &mut T) -> std::result::Result<(), Errno> {
    // SAFETY: `arg` is the struct the request expects, per linux/userfaultfd.h.
    let r = unsafe { libc::ioctl(fd, req as _, arg as *mut T) };
    Errno::result(r).map(drop)
}

impl Uffd {
    pub fn from_fd(fd: OwnedFd) -> Uffd {
        Uffd { fd }
    }

    fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// UFFDIO_API handshake asking for `features`.
    pub fn api(&self, features: u64) -> Result<u64> {
        let mut a = [UFFD_API, features, 0u64];
        ioctl(self.raw(), UFFDIO_API, &mut a).map_err(|e| Error::sys("UFFDIO_API", e))?;
        Ok(a[1])
    }

    pub fn register(&self, start: u64, len: u64, mode: u64) -> Result<()> {
        let mut r = [start, len, mode, 0u64];
        ioctl(self.raw(), UFFDIO_REGISTER, &mut r)
            .map_err(|e| Error::sys(format!("UFFDIO_REGISTER {start:#x}+{len:#x}"), e))
    }

    pub fn unregister(&self, start: u64, len: u64) -> Result<()> {
        let mut r = [start, len];
        ioctl(self.raw(), UFFDIO_UNREGISTER, &mut r).map_err(|e| Error::sys("UFFDIO_UNREGISTER", e))
    }

    pub fn wake(&self, start: u64, len: u64) -> std::result::Result<(), Errno> {
        let mut r = [start, len];
        ioctl(self.raw(), UFFDIO_WAKE, &mut r)
    }

    /// Copies `len` bytes from our `src` into the registered range at `dst`
    /// and wakes the threads waiting there. Returns bytes copied on a
    /// partial copy (Err with the errno and the count).
    pub fn copy(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
    ) -> std::result::Result<(), (Errno, u64)> {
        let mut c = [dst, src as u64, len, 0u64, 0u64];
        match ioctl(self.raw(), UFFDIO_COPY, &mut c) {
            Ok(()) => Ok(()),
            Err(e) => Err((e, if (c[4] as i64) > 0 { c[4] } else { 0 })),
        }
    }

    pub fn zeropage(&self, dst: u64, len: u64) -> std::result::Result<(), Errno> {
        let mut z = [dst, len, 0u64, 0u64];
        ioctl(self.raw(), UFFDIO_ZEROPAGE, &mut z)
    }

    /// Write-protects (or, with `protect` false, unprotects and wakes) a range.
    pub fn writeprotect(
        &self,
        start: u64,
        len: u64,
        protect: bool,
    ) -> std::result::Result<(), Errno> {
        let mut w = [start, len, if protect { WRITEPROTECT_MODE_WP } else { 0 }];
        ioctl(self.raw(), UFFDIO_WRITEPROTECT, &mut w)
    }

    /// Reads the messages available now (the fd is non-blocking).
    pub fn read_msgs(&self) -> std::result::Result<Vec<Msg>, Errno> {
        let mut buf = [0u8; 32 * 64];
        // SAFETY: reading into a local buffer of that size.
        let n = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = Errno::last();
            return if e == Errno::EAGAIN {
                Ok(vec![])
            } else {
                Err(e)
            };
        }
        Ok(buf[..n as usize]
            .chunks_exact(32)
            .map(|m| {
                let w =
                    |i: usize| u64::from_ne_bytes(m[8 + i * 8..16 + i * 8].try_into().expect("8"));
                Msg {
                    event: m[0],
                    arg: [w(0), w(1), w(2)],
                }
            })
            .collect())
    }
}

/// Takes descriptor `fd` of process `pid` (pidfd_getfd; needs ptrace rights).
pub fn take_fd(pid: i32, fd: i32) -> Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscalls; the returned descriptors are owned here.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(Error::sys("pidfd_open", Errno::last()));
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if got < 0 {
            return Err(Error::sys("pidfd_getfd", Errno::last()));
        }
        Ok(OwnedFd::from_raw_fd(got as i32))
    }
}
