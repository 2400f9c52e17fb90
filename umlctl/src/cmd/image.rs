//! Placeholder until its issue lands.

use crate::exit::{fail, CliResult, Code};
use crate::output::Output;

#[derive(clap::Subcommand, Debug)]
pub enum ImageCmd {
    /// Not built yet.
    Todo,
}

pub fn run(_out: Output, _cmd: ImageCmd) -> CliResult {
    fail(Code::Internal, "not built yet")
}
