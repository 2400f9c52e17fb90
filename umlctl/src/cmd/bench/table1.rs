//! Placeholder until its issue lands: table1 benchmark.

use crate::exit::{fail, CliResult, Code};
use crate::output::Output;

#[derive(clap::Args, Debug)]
pub struct Table1Args {}

pub fn run(_out: Output, _args: Table1Args) -> CliResult {
    fail(Code::Internal, "table1 benchmark is not built yet")
}
