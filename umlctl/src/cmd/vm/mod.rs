//! `umlctl vm ...`: User Mode Linux virtual machines.
//!
//! Module map:
//! - `host`: the installed UML kernel (tools/install-uml's uml.conf)
//! - `image`: `vm image build`, guest root filesystems built offline
//! - `state`: the VM directory, settings and status
//! - `lifecycle`: create, start, stop, kill, rm, list
//! - `supervisor`: the background process that runs one VM's UML kernel
//! - `control`: the socket between commands and a supervisor
//! - `guest`: exec and console
//! - `mconsole`: UML's management console protocol
//! - `disk`, `checkpoint`: COW disk layers, checkpoint and rollback
//! - `net`: the host-only network

mod checkpoint;
mod control;
mod disk;
mod guest;
pub mod host;
mod image;
mod lifecycle;
mod mconsole;
mod net;
mod state;
mod supervisor;

// For `bench vm`.
pub use disk::tree_bytes;
pub use state::{group_members, parse_size};

use crate::exit::CliResult;
use crate::output::Output;

#[derive(clap::Subcommand, Debug)]
pub enum VmCmd {
    /// Guest images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Create a VM whose disk is a copy-on-write layer over IMAGE.
    Create(lifecycle::CreateArgs),
    /// Boot a VM; returns once its guest answers.
    Start { name: String },
    /// List VMs: state, pid, memory, address, disk use.
    List,
    /// Attach to a VM's console (Ctrl-] detaches).
    Console(guest::ConsoleArgs),
    /// Run a command in a VM; exits with the command's status.
    Exec(guest::ExecArgs),
    /// Shut a VM down cleanly (halts it if that takes too long).
    Stop(lifecycle::StopArgs),
    /// Kill a VM's processes at once.
    Kill { name: String },
    /// Remove a stopped VM and its disk layer and checkpoints.
    Rm(lifecycle::RmArgs),
    /// Checkpoint a VM's disk; a running VM is paused only while it is recorded.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Roll a VM's disk back to a checkpoint (restarting it if it ran).
    Rollback(checkpoint::CheckpointArgs),
    /// Internal: the supervisor of one running VM (see supervisor.rs).
    #[command(hide = true, name = "__supervise")]
    Supervise { name: String },
}

#[derive(clap::Subcommand, Debug)]
pub enum ImageCmd {
    /// Build a guest root filesystem image (busybox, init, exec agent).
    Build(image::BuildArgs),
}

pub fn run(out: Output, cmd: VmCmd) -> CliResult {
    match cmd {
        VmCmd::Image(ImageCmd::Build(a)) => image::build(out, a),
        VmCmd::Create(a) => lifecycle::create(out, a),
        VmCmd::Start { name } => lifecycle::start(out, &name),
        VmCmd::List => lifecycle::list(out),
        VmCmd::Console(a) => guest::console(a),
        VmCmd::Exec(a) => guest::exec(out, a),
        VmCmd::Stop(a) => lifecycle::stop(out, a),
        VmCmd::Kill { name } => lifecycle::kill(out, &name),
        VmCmd::Rm(a) => lifecycle::rm(out, a),
        VmCmd::Checkpoint(a) => checkpoint::checkpoint(out, a),
        VmCmd::Rollback(a) => checkpoint::rollback(out, a),
        VmCmd::Supervise { name } => supervisor::run(&name),
    }
}
