//! `umlctl`: snapshot, resume and clone Linux processes; manage UML VMs,
//! their copy-on-write disks, upgrades and rollbacks; run the benchmarks.
//!
//! Module map:
//! - `exit`: exit codes and the error type every command returns
//! - `output`: `--json` versus human output, progress bars
//! - `cmd::process`: `snapshot`, `resume` (and the guarded snapshot worker)
//! - `cmd::image`: `image inspect|verify|...`
//! - `cmd::fs`: `fs ...`, the cowfs image layer
//! - `cmd::vm`: `vm ...`, UML virtual machines
//! - `cmd::doctor`: what this host supports
//! - `cmd::bench`: `bench table1|fs|...`

mod cmd;
mod exit;
mod output;

use clap::{Parser, Subcommand};
use exit::{CliResult, Code};
use output::Output;

#[derive(Parser, Debug)]
#[command(
    name = "umlctl",
    version,
    about = "Snapshot, resume and clone Linux processes and User Mode Linux VMs",
    after_help = exit::EXIT_CODES_HELP
)]
struct Cli {
    /// Machine-readable output: one JSON document on stdout, no progress bars.
    #[arg(long, global = true)]
    json: bool,
    /// More log output on stderr (repeat for more); RUST_LOG also works.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Snapshot a running process into an image directory.
    Snapshot(cmd::process::SnapshotArgs),
    /// Resume a process from an image directory; prints the new pid.
    Resume(cmd::process::ResumeArgs),
    /// Start several processes from one image that share its memory until
    /// they write it; prints their pids, one per line.
    Clone(cmd::process::CloneArgs),
    /// Inspect and check snapshot images.
    #[command(subcommand)]
    Image(cmd::image::ImageCmd),
    /// Copy-on-write filesystem stores (cowfs): create, mount, checkpoint, rollback.
    #[command(subcommand)]
    Fs(cmd::fs::FsCmd),
    /// User Mode Linux virtual machines.
    #[command(subcommand)]
    Vm(cmd::vm::VmCmd),
    /// Report what this host supports (UML, ptrace, userfaultfd, FUSE, tun, namespaces).
    Doctor(cmd::doctor::DoctorArgs),
    /// Benchmarks (the paper's Table 1 and the performance targets).
    #[command(subcommand)]
    Bench(cmd::bench::BenchCmd),
    /// Internal: the guarded worker that performs a snapshot (see cmd::process).
    #[command(hide = true, name = "__snapshot-worker")]
    SnapshotWorker(cmd::process::SnapshotArgs),
    /// Internal: holds a process's write tracking (see cmd::process).
    #[command(hide = true, name = "__tracker")]
    Tracker(cmd::process::TrackerArgs),
    /// Internal: the pager of a lazy resume (see cmd::process).
    #[command(hide = true, name = "__pager")]
    Pager(cmd::process::PagerArgs),
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> CliResult {
    let out = Output {
        json: cli.json,
        verbose: cli.verbose,
    };
    match cli.command {
        Command::Snapshot(a) => cmd::process::snapshot(out, a),
        Command::SnapshotWorker(a) => cmd::process::snapshot_worker(out, a),
        Command::Resume(a) => cmd::process::resume(out, a),
        Command::Clone(a) => cmd::process::clone(out, a),
        Command::Pager(a) => cmd::process::pager(out, a),
        Command::Tracker(a) => cmd::process::tracker(out, a),
        Command::Image(c) => cmd::image::run(out, c),
        Command::Fs(c) => cmd::fs::run(out, c),
        Command::Vm(c) => cmd::vm::run(out, c),
        Command::Doctor(a) => cmd::doctor::run(out, a),
        Command::Bench(c) => cmd::bench::run(out, c),
    }
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let json = cli.json;
    match run(cli) {
        Ok(()) => std::process::exit(Code::Ok as i32),
        Err(e) => {
            if json {
                let v = serde_json::json!({"error": e.message, "code": e.code as i32});
                let _ = output::print_line(&v.to_string());
            }
            eprintln!("umlctl: error: {}", e.message);
            std::process::exit(e.code as i32);
        }
    }
}
