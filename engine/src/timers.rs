//! POSIX timers (timer_create) and interval timers (setitimer, alarm).
//!
//! /proc/PID/timers tells each POSIX timer's id, clock, signal and target;
//! the time left and the period only the process can tell (timer_gettime,
//! getitimer, injected). At resume they are created again with their ids
//! (prctl PR_TIMER_CREATE_RESTORE_IDS, Linux 6.17) and armed relative to
//! the resume, so a periodic timer keeps its period and phase.

use crate::error::{Error, Result};
use crate::image::PosixTimer;
use crate::inject::Remote;
use crate::mem::ProcMem;
use std::collections::HashMap;

/// (which, interval ns, value ns), as `image::Process::itimers` keeps them.
pub type Itimer = (i32, u64, u64);

const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
const SIGEV_THREAD_ID: i32 = 4;

/// Parses /proc/PID/timers (the time left is filled in by `query`).
fn parse(text: &str) -> Vec<PosixTimer> {
    let mut out: Vec<PosixTimer> = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k == "ID" {
            out.push(PosixTimer {
                id: v.parse().unwrap_or(-1),
                clock: 0,
                notify: 0,
                signo: 0,
                value: 0,
                tid: 0,
                value_ns: 0,
                interval_ns: 0,
            });
            continue;
        }
        let Some(t) = out.last_mut() else { continue };
        match k {
            "signal" => {
                let (sig, val) = v.split_once('/').unwrap_or((v, "0"));
                t.signo = sig.parse().unwrap_or(0);
                t.value = u64::from_str_radix(val.trim_start_matches("0x"), 16).unwrap_or(0);
            }
            "notify" => {
                let (how, who) = v.split_once('/').unwrap_or((v, ""));
                t.notify = match how {
                    "none" => libc::SIGEV_NONE,
                    "thread" => libc::SIGEV_THREAD,
                    _ => libc::SIGEV_SIGNAL,
                };
                if let Some(tid) = who.strip_prefix("tid.") {
                    t.notify |= SIGEV_THREAD_ID;
                    t.tid = tid.parse().unwrap_or(0);
                }
            }
            "ClockID" => t.clock = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    out
}

fn timespec_ns(b: &[u8]) -> u64 {
    let sec = i64::from_ne_bytes(b[..8].try_into().expect("8"));
    let nsec = i64::from_ne_bytes(b[8..16].try_into().expect("8"));
    (sec.max(0) as u64) * 1_000_000_000 + nsec.max(0) as u64
}

/// The timer queries staged in a batch (`stage`), to be read (`read`)
/// once it ran: one ptrace round trip for all of them, not two per call.
pub struct Staged {
    timers: Vec<(PosixTimer, u64)>,
    itimers: Vec<(i32, u64)>,
}

/// Stages timer_gettime of every POSIX timer of `pid` (listed in
/// /proc/PID/timers) and getitimer of the three itimers in `b`.
pub fn stage(b: &mut crate::inject::Batch, pid: i32) -> Result<Staged> {
    let mut timers = Vec::new();
    for t in parse(&crate::proc::read_proc(pid, "timers")?) {
        let slot = b.data(&[0u8; 32])?;
        b.call(
            "timer_gettime",
            libc::SYS_timer_gettime,
            &[t.id as u64, slot],
        );
        timers.push((t, slot));
    }
    let mut itimers = Vec::new();
    for which in [libc::ITIMER_REAL, libc::ITIMER_VIRTUAL, libc::ITIMER_PROF] {
        let slot = b.data(&[0u8; 32])?;
        b.call("getitimer", libc::SYS_getitimer, &[which as u64, slot]);
        itimers.push((which, slot));
    }
    Ok(Staged { timers, itimers })
}

/// The answers to `stage`'s queries, read from the target's scratch area.
pub fn read(staged: Staged, mem: &ProcMem) -> Result<(Vec<PosixTimer>, Vec<Itimer>)> {
    let mut timers = Vec::new();
    for (mut t, slot) in staged.timers {
        let mut b = [0u8; 32];
        mem.read(slot, &mut b)?;
        t.interval_ns = timespec_ns(&b[..16]);
        t.value_ns = timespec_ns(&b[16..]);
        timers.push(t);
    }
    let mut itimers = Vec::new();
    for (which, slot) in staged.itimers {
        let mut b = [0u8; 32];
        mem.read(slot, &mut b)?;
        let us = |o: usize| {
            let sec = i64::from_ne_bytes(b[o..o + 8].try_into().expect("8"));
            let usec = i64::from_ne_bytes(b[o + 8..o + 16].try_into().expect("8"));
            sec as u64 * 1_000_000_000 + usec as u64 * 1000
        };
        if us(16) != 0 {
            itimers.push((which, us(0), us(16)));
        }
    }
    Ok((timers, itimers))
}

fn timespec_bytes(ns: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&((ns / 1_000_000_000) as i64).to_ne_bytes());
    b[8..].copy_from_slice(&((ns % 1_000_000_000) as i64).to_ne_bytes());
    b
}

/// Creates and arms the timers in the puppet behind `r`; `tids` maps the
/// image's thread ids to the new ones.
pub fn restore(
    r: &mut Remote,
    mem: &ProcMem,
    scratch: u64,
    timers: &[PosixTimer],
    itimers: &[(i32, u64, u64)],
    tids: &HashMap<i32, i32>,
) -> Result<()> {
    if !timers.is_empty() {
        r.check(
            "prctl(PR_TIMER_CREATE_RESTORE_IDS) (needs Linux 6.17)",
            libc::SYS_prctl,
            &[PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0],
        )?;
    }
    for t in timers {
        // struct sigevent: sigev_value, sigev_signo, sigev_notify, then the
        // thread id for SIGEV_THREAD_ID; 64 bytes in all.
        let mut ev = [0u8; 64];
        ev[..8].copy_from_slice(&t.value.to_ne_bytes());
        ev[8..12].copy_from_slice(&t.signo.to_ne_bytes());
        let notify = if t.notify & SIGEV_THREAD_ID != 0 {
            SIGEV_THREAD_ID | (t.notify & !SIGEV_THREAD_ID & !libc::SIGEV_THREAD)
        } else {
            t.notify
        };
        ev[12..16].copy_from_slice(&notify.to_ne_bytes());
        let tid = tids.get(&t.tid).copied().unwrap_or(t.tid);
        ev[16..20].copy_from_slice(&tid.to_ne_bytes());
        mem.write(scratch, &ev)?;
        mem.write(scratch + 64, &t.id.to_ne_bytes())?;
        r.check(
            &format!("timer_create (id {})", t.id),
            libc::SYS_timer_create,
            &[t.clock as u64, scratch, scratch + 64],
        )?;
        let mut got = [0u8; 4];
        mem.read(scratch + 64, &mut got)?;
        if i32::from_ne_bytes(got) != t.id {
            return Err(Error::Restore(format!(
                "timer {} came back with id {}",
                t.id,
                i32::from_ne_bytes(got)
            )));
        }
    }
    if !timers.is_empty() {
        r.check(
            "prctl(PR_TIMER_CREATE_RESTORE_IDS, off)",
            libc::SYS_prctl,
            &[PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0],
        )?;
    }
    arm(r, mem, scratch, timers, itimers)
}

/// Starts the clocks: the last step before the process runs.
fn arm(
    r: &mut Remote,
    mem: &ProcMem,
    scratch: u64,
    timers: &[PosixTimer],
    itimers: &[(i32, u64, u64)],
) -> Result<()> {
    for t in timers.iter().filter(|t| t.value_ns != 0) {
        let mut spec = [0u8; 32];
        spec[..16].copy_from_slice(&timespec_bytes(t.interval_ns));
        spec[16..].copy_from_slice(&timespec_bytes(t.value_ns));
        mem.write(scratch, &spec)?;
        r.check(
            "timer_settime",
            libc::SYS_timer_settime,
            &[t.id as u64, 0, scratch, 0],
        )?;
    }
    for &(which, interval, value) in itimers {
        let tv = |ns: u64| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&((ns / 1_000_000_000) as i64).to_ne_bytes());
            b[8..].copy_from_slice(&((ns % 1_000_000_000 / 1000) as i64).to_ne_bytes());
            b
        };
        let mut spec = [0u8; 32];
        spec[..16].copy_from_slice(&tv(interval));
        spec[16..].copy_from_slice(&tv(value.max(1000)));
        mem.write(scratch, &spec)?;
        r.check(
            "setitimer",
            libc::SYS_setitimer,
            &[which as u64, scratch, 0],
        )?;
    }
    Ok(())
}
