//! eventfd: a counter (and the semaphore flag), both shown in fdinfo.

use super::{owned, Target};
use crate::error::Result;
use crate::image::ObjectKind;
use std::os::fd::OwnedFd;

pub fn dump(t: &Target) -> Result<ObjectKind> {
    let count = t
        .info
        .get("eventfd-count")
        .and_then(|c| u64::from_str_radix(c.trim(), 16).ok())
        .ok_or_else(|| t.unsupported("is an eventfd whose counter /proc does not show"))?;
    let semaphore = t.info.get("eventfd-semaphore").is_some_and(|s| s == "1");
    Ok(ObjectKind::EventFd { count, semaphore })
}

pub fn create(count: u64, semaphore: bool) -> Result<OwnedFd> {
    let sem = if semaphore { libc::EFD_SEMAPHORE } else { 0 };
    // SAFETY: eventfd takes no pointers.
    let fd = owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | sem) }, || {
        "eventfd".into()
    })?;
    if count > 0 {
        nix::unistd::write(&fd, &count.to_ne_bytes())
            .map_err(|e| crate::Error::sys("set an eventfd's counter", e))?;
    }
    Ok(fd)
}
