//! One module per command group; each exposes its clap types and `run`.

pub mod bench;
pub mod doctor;
pub mod fs;
pub mod image;
pub mod process;
pub mod vm;
