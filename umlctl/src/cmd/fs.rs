//! `umlctl fs ...`: cowfs stores (see the cowfs crate): create, mount in
//! the background (a daemon process) or the foreground, checkpoint, list,
//! rollback, diff, delete, umount, fsck.

use crate::exit::{fail, CliError, CliResult, Code};
use crate::output::Output;
use cowfs::{MountOptions, Store, Transport};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(clap::Subcommand, Debug)]
pub enum FsCmd {
    /// Create a store: a writable copy-on-write view over a read-only base directory.
    Create {
        store: PathBuf,
        /// The read-only base directory tree (never modified).
        #[arg(long)]
        base: PathBuf,
        /// Copy-up unit: a power of two from 4K to 16M (suffixes K and M work).
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
    },
    /// Mount a store (in the background unless --foreground).
    Mount {
        store: PathBuf,
        mountpoint: PathBuf,
        /// Serve in this process until unmounted.
        #[arg(long)]
        foreground: bool,
        #[command(flatten)]
        how: MountArgs,
    },
    /// Unmount a cowfs mount and wait until its data is durable.
    Umount { mountpoint: PathBuf },
    /// Make everything written to a mounted store durable, as sync(1)
    /// cannot for a FUSE mount (nothing to do when unmounted).
    Sync { store: PathBuf },
    /// Seal the current state as checkpoint NAME (O(1); mounted or not).
    Checkpoint { store: PathBuf, name: String },
    /// List the checkpoints of a store.
    List { store: PathBuf },
    /// Return the store's view to checkpoint NAME (O(1); later checkpoints go).
    Rollback { store: PathBuf, name: String },
    /// Paths changed from checkpoint A to checkpoint B (default: the current state).
    Diff {
        store: PathBuf,
        a: String,
        b: Option<String>,
    },
    /// Delete checkpoint NAME (the current view does not change).
    Delete { store: PathBuf, name: String },
    /// Check an unmounted store and repair what a crash left behind.
    Fsck {
        store: PathBuf,
        /// Only report, change nothing.
        #[arg(long)]
        check: bool,
    },
    /// Internal: the background daemon; prints "ready" once mounted.
    #[command(hide = true, name = "__daemon")]
    Daemon {
        store: PathBuf,
        mountpoint: PathBuf,
        #[command(flatten)]
        how: MountArgs,
    },
}

/// How to mount a store (`umlctl fs mount`, the daemon, `umlctl bench fs`).
#[derive(clap::Args, Debug, Clone)]
pub struct MountArgs {
    /// FUSE worker threads.
    #[arg(long, default_value_t = cowfs::DEFAULT_THREADS)]
    pub threads: usize,
    /// Let the kernel read files no layer changed straight from the
    /// base (native read speed; writes lose the writeback cache).
    #[arg(long)]
    pub passthrough: bool,
    /// How the kernel hands requests to the daemon: FUSE over io_uring,
    /// one queue per CPU (faster metadata; needs
    /// /sys/module/fuse/parameters/enable_uring = Y), or /dev/fuse; auto
    /// takes io_uring where the kernel offers it.
    #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
    pub transport: TransportArg,
    /// Same as --transport io-uring.
    #[arg(long, conflicts_with = "transport")]
    pub io_uring: bool,
    /// With FUSE over io_uring: threads per online CPU (each serves one
    /// request at a time; fewer save threads and memory on hosts with
    /// many CPUs).
    #[arg(long, default_value_t = cowfs::DEFAULT_RING_THREADS, value_parser = parse_ring_threads)]
    pub ring_threads: usize,
}

/// `--transport`, as clap spells it.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportArg {
    Auto,
    IoUring,
    DevFuse,
}

impl From<TransportArg> for Transport {
    fn from(t: TransportArg) -> Transport {
        match t {
            TransportArg::Auto => Transport::Auto,
            TransportArg::IoUring => Transport::IoUring,
            TransportArg::DevFuse => Transport::DevFuse,
        }
    }
}

impl From<Transport> for TransportArg {
    fn from(t: Transport) -> TransportArg {
        match t {
            Transport::Auto => TransportArg::Auto,
            Transport::IoUring => TransportArg::IoUring,
            Transport::DevFuse => TransportArg::DevFuse,
        }
    }
}

/// `t` as `--transport` spells it.
pub(crate) fn transport_name(t: Transport) -> String {
    let arg = clap::ValueEnum::to_possible_value(&TransportArg::from(t));
    arg.expect("every transport has a name")
        .get_name()
        .to_string()
}

impl MountArgs {
    pub fn options(&self) -> MountOptions {
        let transport = if self.io_uring {
            Transport::IoUring
        } else {
            self.transport.into()
        };
        MountOptions {
            threads: self.threads,
            passthrough: self.passthrough,
            transport,
            ring_threads: self.ring_threads,
        }
    }
}

/// The daemon's command line for `opts` (the inverse of `MountArgs::options`).
fn daemon_args(opts: &MountOptions) -> Vec<String> {
    let mut args = vec![
        format!("--threads={}", opts.threads),
        format!("--transport={}", transport_name(opts.transport)),
        format!("--ring-threads={}", opts.ring_threads),
    ];
    if opts.passthrough {
        args.push("--passthrough".into());
    }
    args
}

fn parse_ring_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ 1..=64) => Ok(n),
        _ => Err(format!("bad ring thread count {s:?}: use 1 to 64")),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1024),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("bad size {s:?}: use a number of bytes, or with K or M"))
}

/// The library's error classes as exit codes (for every command that uses
/// cowfs).
pub fn cli(e: cowfs::Error) -> CliError {
    let code = match &e {
        cowfs::Error::NotFound(_) => Code::NotFound,
        cowfs::Error::Conflict(_) => Code::Conflict,
        cowfs::Error::BadStore(_) => Code::BadImage,
        cowfs::Error::Invalid(_) => Code::Usage,
        cowfs::Error::Environment(_) => Code::Environment,
        cowfs::Error::Io { .. } => Code::Internal,
    };
    CliError::new(code, e.to_string())
}

fn open(store: &Path) -> CliResult<Store> {
    Store::open(store).map_err(cli)
}

pub fn run(out: Output, cmd: FsCmd) -> CliResult {
    match cmd {
        FsCmd::Create {
            store,
            base,
            block_size,
        } => {
            let s = Store::create(&store, &base, block_size).map_err(cli)?;
            out.emit(
                &json!({"store": s.dir(), "base": s.base(), "block_size": s.block_size()}),
                || {
                    format!(
                        "created store {} over {}",
                        s.dir().display(),
                        s.base().display()
                    )
                },
            );
            Ok(())
        }
        FsCmd::Mount {
            store,
            mountpoint,
            foreground,
            how,
        } => {
            let s = open(&store)?;
            let opts = how.options();
            if foreground {
                return s.serve(&mountpoint, &opts, || {}).map_err(cli);
            }
            let pid = spawn_daemon(&s, &mountpoint, &opts)?;
            out.emit(
                &json!({"store": s.dir(), "mountpoint": mountpoint, "pid": pid}),
                || {
                    format!(
                        "mounted {} on {} (daemon pid {pid})",
                        s.dir().display(),
                        mountpoint.display()
                    )
                },
            );
            Ok(())
        }
        FsCmd::Daemon {
            store,
            mountpoint,
            how,
        } => {
            let s = open(&store)?;
            let opts = how.options();
            s.serve(&mountpoint, &opts, || {
                println!("ready");
                // Nothing more goes to the parent: it has stopped reading.
                if let Ok(null) = std::fs::File::create("/dev/null") {
                    let _ = nix::unistd::dup2_stdout(null);
                }
            })
            .map_err(cli)
        }
        FsCmd::Sync { store } => {
            open(&store)?.sync().map_err(cli)?;
            out.emit(&json!({"synced": store}), String::new);
            Ok(())
        }
        FsCmd::Umount { mountpoint } => {
            cowfs::unmount(&mountpoint).map_err(cli)?;
            out.emit(&json!({"unmounted": mountpoint}), String::new);
            Ok(())
        }
        FsCmd::Checkpoint { store, name } => {
            let cp = open(&store)?.checkpoint(&name).map_err(cli)?;
            out.emit(&cp, || {
                format!("checkpoint {} (layer {})", cp.name, cp.layer)
            });
            Ok(())
        }
        FsCmd::List { store } => {
            let list = open(&store)?.list().map_err(cli)?;
            out.emit(&list, || {
                list.iter()
                    .map(|c| format!("{}\tlayer {}\tcreated {}", c.name, c.layer, c.created))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
        FsCmd::Rollback { store, name } => {
            open(&store)?.rollback(&name).map_err(cli)?;
            out.emit(&json!({"rolled_back_to": name}), String::new);
            Ok(())
        }
        FsCmd::Diff { store, a, b } => {
            let changes = open(&store)?.diff(&a, b.as_deref()).map_err(cli)?;
            out.emit(&changes, || {
                changes
                    .iter()
                    .map(|c| {
                        let mark = match c.change {
                            cowfs::ChangeKind::Added => 'A',
                            cowfs::ChangeKind::Deleted => 'D',
                            cowfs::ChangeKind::Modified => 'M',
                        };
                        format!("{mark} {}", c.path.display())
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
        FsCmd::Delete { store, name } => {
            open(&store)?.delete(&name).map_err(cli)?;
            out.emit(&json!({"deleted": name}), String::new);
            Ok(())
        }
        FsCmd::Fsck { store, check } => {
            let report = open(&store)?.fsck(!check).map_err(cli)?;
            out.emit(&report, || {
                let mut lines: Vec<String> = report
                    .errors
                    .iter()
                    .map(|e| format!("error: {e}"))
                    .collect();
                lines.extend(report.unfinished.iter().map(|u| format!("unfinished: {u}")));
                if report.clean() {
                    lines.push("clean".into());
                } else if report.repaired {
                    lines.push("repaired".into());
                }
                lines.join("\n")
            });
            if !report.errors.is_empty() && !report.repaired {
                return fail(
                    Code::BadImage,
                    format!("store {} has errors", store.display()),
                );
            }
            Ok(())
        }
    }
}

/// Start `umlctl fs __daemon` in its own process group, wait until it has
/// mounted (it prints "ready"), and return its pid. Its log (and, on
/// failure, its error) is in the store's daemon.log.
pub(crate) fn spawn_daemon(
    store: &Store,
    mountpoint: &Path,
    opts: &MountOptions,
) -> CliResult<u32> {
    let log_path = store.log_path();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode_0600()
        .open(&log_path)
        .map_err(|e| CliError::new(Code::Internal, format!("open {}: {e}", log_path.display())))?;
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["fs", "__daemon"])
        .arg(store.dir())
        .arg(mountpoint)
        .args(daemon_args(opts))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()?;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped stdout");
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim() == "ready" {
        return Ok(child.id());
    }
    let status = child.wait()?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let message = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("umlctl: error: "))
        .unwrap_or("the cowfs daemon failed to start; see its log")
        .to_string();
    let code = match status.code() {
        Some(3) => Code::BadImage,
        Some(6) => Code::Conflict,
        Some(7) => Code::NotFound,
        Some(8) => Code::Environment,
        Some(2) => Code::Usage,
        _ => Code::Internal,
    };
    fail(code, message)
}

/// Files the CLI creates are private to their owner.
trait Private {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Private for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}
