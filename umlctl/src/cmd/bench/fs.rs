//! Placeholder until its issue lands: cowfs benchmark.

use crate::exit::{fail, CliResult, Code};
use crate::output::Output;

#[derive(clap::Args, Debug)]
pub struct FsBenchArgs {}

pub fn run(_out: Output, _args: FsBenchArgs) -> CliResult {
    fail(Code::Internal, "cowfs benchmark is not built yet")
}
