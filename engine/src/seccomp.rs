//! Seccomp: a process confined by seccomp is refused for now, before
//! anything is written (restoring its filters, which must come last, after
//! every injected syscall, is not done yet). Dropping them silently would
//! resume the program with less confinement than it had.

use crate::error::{Error, Result};
use crate::proc;

/// Refuses a process (any of its threads) in seccomp strict or filter mode.
pub fn check(pid: i32) -> Result<()> {
    for tid in proc::threads(pid)? {
        let st = proc::status(tid)?;
        let mode = st.get("Seccomp").map(String::as_str).unwrap_or("0");
        if mode != "0" {
            let filters = st.get("Seccomp_filters").cloned().unwrap_or_default();
            return Err(Error::Unsupported {
                pid,
                what: format!(
                    "thread {tid} runs under seccomp (mode {mode}, {filters} filters), which snapshots do not restore yet: snapshot it before it installs its filters"
                ),
            });
        }
    }
    Ok(())
}
