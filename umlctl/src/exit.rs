//! Exit codes and the one error type every command returns.
//!
//! Orchestrators branch on these codes, so they are part of the stable
//! interface: never renumber one, only add new ones.

use std::fmt;

/// The documented exit codes of `umlctl` (also listed in `umlctl --help`).
/// (Some codes are produced only by some commands, or by clap itself.)
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// Everything worked.
    Ok = 0,
    /// An unexpected failure (a bug, or an I/O error with no better class).
    Internal = 1,
    /// Bad command line (clap uses 2 as well).
    Usage = 2,
    /// An image or store is corrupt, truncated, missing a file or of an unknown version.
    BadImage = 3,
    /// The target process cannot be snapshotted as it is (missing, zombie,
    /// kernel thread, traced by someone else, not permitted).
    Target = 4,
    /// The target holds something this version cannot save (a socket, ...).
    Unsupported = 5,
    /// A conflict: pid in use, mountpoint busy, name taken, already running.
    Conflict = 6,
    /// A named thing does not exist: VM, checkpoint, store.
    NotFound = 7,
    /// The host lacks something needed: UML, FUSE, userfaultfd, a package.
    Environment = 8,
    /// The operation was interrupted (signal, parent gone) and rolled back.
    Interrupted = 9,
}

/// Text for `umlctl --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  internal error
  2  usage error
  3  bad image or store (corrupt, truncated, missing file, unknown version)
  4  target process cannot be snapshotted (missing, zombie, kernel thread, traced, not permitted)
  5  unsupported object in the target (the message names it)
  6  conflict (pid in use, mountpoint busy, name taken, already running)
  7  not found (VM, checkpoint, store)
  8  host environment lacks something (UML, FUSE, userfaultfd, ...)
  9  interrupted and rolled back";

/// An error with the exit code it maps to. The message is one line that
/// names the thing that went wrong and, where there is one, the fix.
#[derive(Debug)]
pub struct CliError {
    pub code: Code,
    pub message: String,
}

impl CliError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        // A CliError wrapped in anyhow keeps its code.
        match e.downcast::<CliError>() {
            Ok(c) => c,
            Err(e) => CliError::new(Code::Internal, format!("{e:#}")),
        }
    }
}

impl std::error::Error for CliError {}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::new(Code::Internal, e.to_string())
    }
}

/// Shorthand for returning an error with a code.
pub fn fail<T>(code: Code, message: impl Into<String>) -> Result<T, CliError> {
    Err(CliError::new(code, message))
}

pub type CliResult<T = ()> = Result<T, CliError>;
