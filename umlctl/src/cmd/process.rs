//! `snapshot` and `resume` (being built).

use crate::exit::{fail, CliResult, Code};
use crate::output::Output;

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {}

#[derive(clap::Args, Debug)]
pub struct ResumeArgs {}

pub fn snapshot(_out: Output, _a: SnapshotArgs) -> CliResult {
    fail(Code::Internal, "not built yet")
}

pub fn snapshot_worker(_out: Output, _a: SnapshotArgs) -> CliResult {
    fail(Code::Internal, "not built yet")
}

pub fn resume(_out: Output, _a: ResumeArgs) -> CliResult {
    fail(Code::Internal, "not built yet")
}
