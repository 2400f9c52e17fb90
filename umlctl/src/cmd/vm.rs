//! Placeholder until its issue lands.

use crate::exit::{fail, CliResult, Code};
use crate::output::Output;

#[derive(clap::Subcommand, Debug)]
pub enum VmCmd {
    /// Not built yet.
    Todo,
}

pub fn run(_out: Output, _cmd: VmCmd) -> CliResult {
    fail(Code::Internal, "not built yet")
}
