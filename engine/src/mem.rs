//! Reading and writing another process's memory: /proc/PID/mem for small
//! or protected ranges (it can write read-only pages), process_vm_readv and
//! process_vm_writev for bulk copies.

use crate::error::{Error, IoContext, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

pub struct ProcMem {
    pub pid: i32,
    file: File,
}

impl ProcMem {
    pub fn open(pid: i32) -> Result<ProcMem> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .ctx(|| format!("open /proc/{pid}/mem"))?;
        Ok(ProcMem { pid, file })
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, addr)
            .ctx(|| format!("read {} bytes at {addr:#x} of pid {}", buf.len(), self.pid))
    }

    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<()> {
        self.file
            .write_all_at(buf, addr)
            .ctx(|| format!("write {} bytes at {addr:#x} of pid {}", buf.len(), self.pid))
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }
}

/// At most this many iovecs per process_vm_* call (the kernel's UIO_MAXIOV).
const MAX_IOV: usize = 1024;

/// Copies remote ranges `(addr, len)` into `buf` (their lengths add up to
/// buf.len()), in as few syscalls as the kernel allows.
pub fn vm_read(pid: i32, ranges: &[(u64, usize)], buf: &mut [u8]) -> Result<()> {
    vm_copy(pid, ranges, buf.as_mut_ptr(), buf.len(), false)
}

/// Copies `buf` into remote ranges `(addr, len)`.
pub fn vm_write(pid: i32, ranges: &[(u64, usize)], buf: &[u8]) -> Result<()> {
    vm_copy(pid, ranges, buf.as_ptr() as *mut u8, buf.len(), true)
}

fn vm_copy(
    pid: i32,
    ranges: &[(u64, usize)],
    local: *mut u8,
    len: usize,
    write: bool,
) -> Result<()> {
    let total: usize = ranges.iter().map(|r| r.1).sum();
    assert_eq!(total, len, "ranges must cover the buffer");
    let mut done = 0usize;
    for chunk in ranges.chunks(MAX_IOV) {
        let chunk_len: usize = chunk.iter().map(|r| r.1).sum();
        let mut off = 0usize;
        // A short copy stops at the first faulting page; retry from there.
        while off < chunk_len {
            let iovs = remote_iovs(chunk, off);
            let liov = libc::iovec {
                // SAFETY: done + off < len, inside the caller's buffer.
                iov_base: unsafe { local.add(done + off) }.cast(),
                iov_len: chunk_len - off,
            };
            // SAFETY: the local iovec covers a live buffer; remote iovecs are
            // only read by the kernel.
            let r = unsafe {
                if write {
                    libc::process_vm_writev(pid, &liov, 1, iovs.as_ptr(), iovs.len() as u64, 0)
                } else {
                    libc::process_vm_readv(pid, &liov, 1, iovs.as_ptr(), iovs.len() as u64, 0)
                }
            };
            if r <= 0 {
                let what = if write {
                    "process_vm_writev"
                } else {
                    "process_vm_readv"
                };
                let at = iovs.first().map(|v| v.iov_base as u64).unwrap_or(0);
                return Err(Error::io(
                    format!("{what} pid {pid} at {at:#x}"),
                    std::io::Error::last_os_error(),
                ));
            }
            off += r as usize;
        }
        done += chunk_len;
    }
    Ok(())
}

/// The remote iovecs of `chunk` starting `off` bytes into it.
fn remote_iovs(chunk: &[(u64, usize)], mut off: usize) -> Vec<libc::iovec> {
    let mut v = Vec::with_capacity(chunk.len());
    for &(addr, len) in chunk {
        if off >= len {
            off -= len;
            continue;
        }
        v.push(libc::iovec {
            iov_base: (addr + off as u64) as *mut libc::c_void,
            iov_len: len - off,
        });
        off = 0;
    }
    v
}
