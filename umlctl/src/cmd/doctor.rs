//! Placeholder until its issue lands: doctor.

use crate::exit::{fail, CliResult, Code};
use crate::output::Output;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {}

pub fn run(_out: Output, _args: DoctorArgs) -> CliResult {
    fail(Code::Internal, "doctor is not built yet")
}
