//! signalfd: only its signal mask is its own (the signals it reads are the
//! reading thread's pending ones, restored with the threads).

use super::{owned, Target};
use crate::error::Result;
use crate::image::ObjectKind;
use std::os::fd::OwnedFd;

pub fn dump(t: &Target) -> Result<ObjectKind> {
    let mask = t
        .info
        .get("sigmask")
        .and_then(|m| u64::from_str_radix(m, 16).ok())
        .ok_or_else(|| t.unsupported("is a signalfd whose mask /proc does not show"))?;
    Ok(ObjectKind::SignalFd { mask })
}

pub fn create(mask: u64) -> Result<OwnedFd> {
    // SAFETY: the kernel reads 8 bytes of mask (the size passed).
    let r = unsafe { libc::syscall(libc::SYS_signalfd4, -1, &mask, 8usize, libc::SFD_CLOEXEC) };
    owned(r as i32, || "signalfd".into())
}
