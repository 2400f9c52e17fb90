//! timerfd: clock, time to the next expiry, period and unread expirations
//! (timerfd_gettime on a duplicate, and fdinfo). It is re-armed relative to the resume, so that it keeps
//! its rate; unread expirations come back with TFD_IOC_SET_TICKS.

use super::{check, owned, take, Target};
use crate::error::Result;
use crate::image::ObjectKind;
use std::os::fd::{AsRawFd, OwnedFd};

/// linux/timerfd.h: _IOW('T', 0, u64).
const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

pub fn dump(t: &Target) -> Result<ObjectKind> {
    // timerfd_gettime on the same file first: an expired periodic timer is
    // only re-armed (and its missed expirations counted into `ticks`) when
    // it is read or queried, and fdinfo shows it as it is.
    let f = take(t)?;
    // SAFETY: itimerspec is plain integers; zero is valid.
    let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: spec is a valid out pointer.
    let r = unsafe { libc::timerfd_gettime(f.as_raw_fd(), &mut spec) };
    check(r as _, || {
        format!("timerfd_gettime on fd {} of pid {}", t.fd, t.pid)
    })?;
    let info = crate::proc::fdinfo(t.pid, t.fd)?;
    let get = |k: &str| info.get(k).map(String::as_str);
    let parsed = (|| {
        Some(ObjectKind::TimerFd {
            clock: get("clockid")?.parse().ok()?,
            ticks: get("ticks")?.parse().ok()?,
            value_ns: ns(&spec.it_value),
            interval_ns: ns(&spec.it_interval),
        })
    })();
    parsed.ok_or_else(|| t.unsupported("is a timerfd whose state /proc does not show"))
}

fn ns(t: &libc::timespec) -> u64 {
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

pub fn create(kind: &ObjectKind) -> Result<OwnedFd> {
    let ObjectKind::TimerFd {
        clock,
        value_ns,
        interval_ns,
        ticks,
    } = *kind
    else {
        unreachable!("timerfd::create of another kind")
    };
    // SAFETY: timerfd_create takes no pointers.
    let fd = owned(
        unsafe { libc::timerfd_create(clock, libc::TFD_CLOEXEC) },
        || format!("timerfd_create(clock {clock})"),
    )?;
    let spec = libc::itimerspec {
        it_interval: ts(interval_ns),
        it_value: ts(value_ns),
    };
    // SAFETY: spec is a valid itimerspec; no old value is read.
    let r = unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    check(r as _, || "timerfd_settime".into())?;
    if ticks > 0 {
        // SAFETY: the ioctl reads one u64.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) };
        check(r as _, || "TFD_IOC_SET_TICKS".into())?;
    }
    Ok(fd)
}

pub fn ts(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / 1_000_000_000) as i64,
        tv_nsec: (ns % 1_000_000_000) as i64,
    }
}
