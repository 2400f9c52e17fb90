//! The clones figure of `umlctl bench table1`: the memory that N clones of
//! one image add (`engine::clone_image`), beside the memory one resume of
//! the same image adds, measured in the same run.
//!
//! Memory is counted per process, not from /proc/meminfo (other work on the
//! host moves that): each process's proportional share of anonymous memory
//! (Pss_Anon: a page shared by k processes counts 1/k in each, so the sum
//! over the clones is the memory they hold between them) plus its page
//! tables (VmPTE), which every clone has its own of. The workload writes one
//! word per millisecond, so the clones are measured "before they write", as
//! the target says, up to the few pages they dirty while being measured.

use super::table1::{kill, start_workload_with};
use crate::cmd::process::engine_error;
use crate::exit::{CliError, CliResult, Code};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Serialize, Debug)]
pub struct ClonesRow {
    size_mib: u64,
    count: usize,
    /// Memory one resume of the image adds (MiB).
    one_resume_mib: f64,
    /// Memory all the clones add together (MiB).
    clones_mib: f64,
    /// clones_mib / one_resume_mib: the target is <= 1.5.
    clones_vs_one: f64,
    /// Time to start every clone (template included), and to build the
    /// template alone (ms).
    clones_ms: f64,
    template_ms: f64,
    /// Time of the one resume (ms), for scale.
    one_resume_ms: f64,
}

pub fn measure(base: &Path, mib: u64, count: usize) -> CliResult<ClonesRow> {
    let mut child = start_workload_with(mib, &["--sleep-every", "1"])?;
    let dir = base.join("clones-image");
    let dump = engine::dump(child.id() as i32, &dir, &engine::DumpOptions::default());
    let _ = child.kill();
    let _ = child.wait();
    dump.map_err(engine_error)?;
    let quiet = engine::ResumeOptions {
        stdio: engine::Stdio::Null,
        ..Default::default()
    };
    let t0 = Instant::now();
    let one = engine::resume(&dir, &quiet).map_err(engine_error)?;
    let one_resume_ms = t0.elapsed().as_secs_f64() * 1e3;
    let one_kib = memory_kib(one.pid);
    kill(one.pid);
    let opts = engine::CloneOptions {
        count,
        stdio: engine::Stdio::Null,
    };
    let r = engine::clone_image(&dir, &opts).map_err(engine_error)?;
    let clones_kib: CliResult<Vec<u64>> = r.clones.iter().map(|c| memory_kib(c.pid)).collect();
    r.clones.iter().for_each(|c| kill(c.pid));
    std::fs::remove_dir_all(&dir)?;
    let (one_kib, clones_kib) = (one_kib?, clones_kib?.iter().sum::<u64>());
    Ok(ClonesRow {
        size_mib: mib,
        count,
        one_resume_mib: one_kib as f64 / 1024.0,
        clones_mib: clones_kib as f64 / 1024.0,
        clones_vs_one: clones_kib as f64 / one_kib.max(1) as f64,
        clones_ms: r.elapsed.as_secs_f64() * 1e3,
        template_ms: r.template.as_secs_f64() * 1e3,
        one_resume_ms,
    })
}

/// Pss_Anon + VmPTE of `pid`, in KiB.
fn memory_kib(pid: i32) -> CliResult<u64> {
    let field = |file: &str, name: &str| -> CliResult<u64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| {
                CliError::new(
                    Code::Internal,
                    format!("no {name} in /proc/{pid}/{file}: is this kernel's format different?"),
                )
            })
    };
    Ok(field("smaps_rollup", "Pss_Anon:")? + field("status", "VmPTE:")?)
}

pub fn table(r: &ClonesRow) -> String {
    format!(
        "\n\nClones: {} clones of one {} MiB image (`umlctl clone`) vs one resume of it, memory added\n\
         (proportional anonymous memory + page tables, summed over the clones)\n\n\
         | clones | one resume MiB | all clones MiB | clones/one | {} separate resumes MiB | start all ms | template ms | one resume ms |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n\
         | {} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.1} | {:.1} | {:.1} |\n",
        r.count,
        r.size_mib,
        r.count,
        r.count,
        r.one_resume_mib,
        r.clones_mib,
        r.clones_vs_one,
        r.one_resume_mib * r.count as f64,
        r.clones_ms,
        r.template_ms,
        r.one_resume_ms,
    )
}
