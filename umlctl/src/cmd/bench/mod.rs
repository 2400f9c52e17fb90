//! `umlctl bench ...`: each benchmark in its own module. Every figure is
//! printed beside a baseline measured in the same run, as a ratio.

pub mod clones;
pub mod criu;
pub mod fs;
pub mod table1;
pub mod vm;

use crate::exit::CliResult;
use crate::output::Output;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// The paper's Table 1: snapshot and resume time against process size.
    Table1(table1::Table1Args),
    /// cowfs against the native filesystem, overlayfs and fuse-overlayfs.
    Fs(fs::FsBenchArgs),
    /// UML VMs: boot, exec, checkpoint, rollback, memory and disk per VM.
    Vm(vm::VmBenchArgs),
}

/// A line of a benchmark's SVG chart: ms by size, in the order of its rows.
#[derive(Clone)]
pub struct ChartLine {
    pub name: &'static str,
    pub color: &'static str,
    pub dashed: bool,
    pub ms: Vec<f64>,
}

pub fn run(out: Output, cmd: BenchCmd) -> CliResult {
    match cmd {
        BenchCmd::Table1(a) => table1::run(out, a),
        BenchCmd::Fs(a) => fs::run(out, a),
        BenchCmd::Vm(a) => vm::run(out, a),
    }
}
