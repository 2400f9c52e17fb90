//! Seccomp filters and their restoration, last of all.
//!
//! The dump reads each thread's filters with PTRACE_SECCOMP_GET_FILTER
//! (and their flags with PTRACE_SECCOMP_GET_METADATA), which needs
//! CAP_SYS_ADMIN; a confined target is traced with PTRACE_O_SUSPEND_SECCOMP,
//! so that the syscalls injected to query it are not filtered (and, say,
//! killed) by the filters they are not part of. The resume does the same
//! for the puppet: its threads install the filters, oldest first, under
//! suspension, and the filters take effect when the threads are detached:
//! nothing the resumer injects is ever subject to them. Strict mode
//! (mode 1) is refused.

use crate::error::{Error, Result};
use crate::image::SeccompFilter;
use crate::inject::Remote;
use crate::mem::ProcMem;
use crate::proc;
use nix::sys::ptrace::Options;

const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;
const PTRACE_O_SUSPEND_SECCOMP: libc::c_int = 1 << 21;
const SECCOMP_SET_MODE_FILTER: u64 = 1;

/// Refuses strict mode; true if some thread of `pid` runs under filters.
pub fn confined(pid: i32) -> Result<bool> {
    let mut any = false;
    for tid in proc::threads(pid)? {
        let st = proc::status(tid)?;
        match st.get("Seccomp").map(String::as_str).unwrap_or("0") {
            "0" => {}
            "2" => any = true,
            mode => {
                return Err(Error::Unsupported {
                    pid,
                    what: format!("thread {tid} runs in seccomp mode {mode} (strict), which cannot be resumed: snapshot it before it enters strict mode"),
                })
            }
        }
    }
    Ok(any)
}

/// `opts` plus PTRACE_O_SUSPEND_SECCOMP.
pub fn suspending(opts: Options) -> Options {
    Options::from_bits_retain(opts.bits() | PTRACE_O_SUSPEND_SECCOMP)
}

/// The filters of a stopped, traced thread, oldest first.
pub fn filters(tid: i32) -> Result<Vec<SeccompFilter>> {
    let mut out = Vec::new();
    if proc::status(tid)?.get("Seccomp").map(String::as_str) != Some("2") {
        return Ok(out);
    }
    for index in 0.. {
        // SAFETY: a null buffer asks for the instruction count only.
        let n = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as usize,
                std::ptr::null_mut::<u8>(),
            )
        };
        if n < 0 {
            let e = nix::errno::Errno::last();
            if e == nix::errno::Errno::ENOENT {
                break;
            }
            return Err(Error::sys(
                format!("PTRACE_SECCOMP_GET_FILTER {tid} (needs CAP_SYS_ADMIN)"),
                e,
            ));
        }
        let mut prog = vec![0u8; n as usize * 8];
        // SAFETY: prog holds n sock_filter records of 8 bytes.
        let r = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as usize,
                prog.as_mut_ptr(),
            )
        };
        nix::errno::Errno::result(r).map_err(|e| Error::sys("PTRACE_SECCOMP_GET_FILTER", e))?;
        let mut meta = [index as u64, 0u64];
        // SAFETY: meta is a struct seccomp_metadata of the size passed.
        let r =
            unsafe { libc::ptrace(PTRACE_SECCOMP_GET_METADATA, tid, 16usize, meta.as_mut_ptr()) };
        let flags = if r < 0 { 0 } else { meta[1] };
        out.push(SeccompFilter { flags, prog });
    }
    out.reverse();
    Ok(out)
}

/// Installs `filters` (oldest first) as the thread behind `r`, which the
/// caller has set to PTRACE_O_SUSPEND_SECCOMP; `scratch` has room for the
/// largest program (BPF_MAXINSNS = 4096 instructions, 32 KiB) and a header.
pub fn install(
    r: &mut Remote,
    mem: &ProcMem,
    scratch: u64,
    filters: &[SeccompFilter],
) -> Result<()> {
    for f in filters {
        let prog_at = scratch + 16;
        mem.write(prog_at, &f.prog)?;
        let mut fprog = [0u8; 16];
        fprog[..2].copy_from_slice(&((f.prog.len() / 8) as u16).to_ne_bytes());
        fprog[8..].copy_from_slice(&prog_at.to_ne_bytes());
        mem.write(scratch, &fprog)?;
        r.check(
            "seccomp(SECCOMP_SET_MODE_FILTER)",
            libc::SYS_seccomp,
            &[SECCOMP_SET_MODE_FILTER, f.flags, scratch],
        )?;
    }
    Ok(())
}

/// Sets PTRACE_O_SUSPEND_SECCOMP (with the puppet's usual options) on `tid`.
pub fn suspend(tid: i32) -> Result<()> {
    let opts = suspending(
        Options::PTRACE_O_TRACESYSGOOD
            | Options::PTRACE_O_TRACECLONE
            | Options::PTRACE_O_TRACEFORK
            | Options::PTRACE_O_EXITKILL,
    );
    nix::sys::ptrace::setoptions(nix::unistd::Pid::from_raw(tid), opts).map_err(|e| {
        Error::sys(
            format!("PTRACE_O_SUSPEND_SECCOMP on {tid} (needs CAP_SYS_ADMIN)"),
            e,
        )
    })
}
