//! How commands talk to the user: human text or `--json`, and progress bars
//! only when stderr is a terminal and `--json` is off.

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;

/// Global output settings, from the top-level flags.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    pub json: bool,
    /// How many -v were given (passed on to helper processes).
    pub verbose: u8,
}

impl Output {
    /// Print a result: JSON on one line with `--json`, else the human text.
    pub fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) {
        let text = if self.json {
            serde_json::to_string(value).expect("serializable output")
        } else {
            human()
        };
        // A reader that went away (`umlctl ... | head`) ends the output
        // quietly, as for other Unix tools.
        if !text.is_empty() && !print_line(&text) {
            std::process::exit(0);
        }
    }

    /// Whether progress bars may be drawn.
    pub fn interactive(&self) -> bool {
        !self.json && std::io::stderr().is_terminal()
    }

    /// A byte-count progress bar, hidden when not interactive.
    pub fn bytes_bar(&self, total: u64, what: &str) -> ProgressBar {
        if !self.interactive() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        bar
    }
}

/// Writes a line to stdout; false when its reader went away, where
/// println! would panic. (SIGPIPE stays ignored: the daemons in this binary
/// write to sockets whose peers may go, and must not die of it.)
pub fn print_line(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = writeln!(out, "{text}").and_then(|()| out.flush());
    !written.is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}
