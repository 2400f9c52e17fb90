//! Talking to a running guest: `vm exec` (a command, its output and exit
//! status, through the guest agent) and `vm console` (the guest's console).

use super::control::{self, Request};
use super::state::{Status, Store};
use crate::exit::{fail, CliResult, Code};
use crate::output::Output;
use serde::Serialize;
use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    pub name: String,
    /// Give up waiting after this many seconds (the command goes on in the
    /// guest, and later commands wait for it).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// The command and its arguments (after --).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Runs the command in the guest; umlctl then exits with its status.
pub fn exec(out: Output, a: ExecArgs) -> CliResult {
    let store = Store::open()?;
    let vm = store.load(&a.name)?;
    if let Status::Dead { reason } = vm.status() {
        return fail(
            Code::Conflict,
            format!("VM {} is dead ({reason}): start it again", a.name),
        );
    }
    let r = control::exec(&vm, &a.command, a.timeout.map(Duration::from_secs))?;
    #[derive(Serialize)]
    struct Done {
        status: i32,
        stdout: String,
        stderr: String,
    }
    if out.json {
        let done = Done {
            status: r.status,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        };
        out.emit(&done, String::new);
    } else {
        std::io::stdout().write_all(&r.stdout)?;
        std::io::stderr().write_all(&r.stderr)?;
    }
    std::io::stdout().flush()?;
    std::process::exit(r.status.clamp(0, 255));
}

#[derive(clap::Args, Debug)]
pub struct ConsoleArgs {
    pub name: String,
    /// Without a terminal: seconds to keep printing output after stdin ends.
    #[arg(long, default_value_t = 1.0)]
    pub linger: f64,
}

/// Attaches to the guest console. On a terminal, Ctrl-] detaches.
pub fn console(a: ConsoleArgs) -> CliResult {
    let store = Store::open()?;
    let vm = store.load(&a.name)?;
    let stream = control::connect(&vm)?;
    let reply = control::call_on(&stream, &Request::Console)?;
    if !reply.ok {
        return fail(Code::Internal, reply.error.unwrap_or_default());
    }
    let mut from_vm = stream.try_clone()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdout = std::io::stdout();
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0
                || stdout
                    .write_all(&buf[..n])
                    .and_then(|_| stdout.flush())
                    .is_err()
            {
                break;
            }
        }
    });
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("[attached to VM {}: Ctrl-] detaches]", a.name);
        let _raw = RawTerminal::enter()?;
        pump_until_escape(stream)?;
        eprintln!("\r\n[detached]");
    } else {
        let mut to_vm = stream;
        std::io::copy(&mut stdin.lock(), &mut to_vm)?;
        std::thread::sleep(Duration::from_secs_f64(a.linger.max(0.0)));
    }
    Ok(())
}

/// Copies keystrokes to the VM until Ctrl-] (0x1d).
fn pump_until_escape(mut to_vm: std::os::unix::net::UnixStream) -> CliResult {
    let mut buf = [0u8; 1024];
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = stdin.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        if let Some(i) = buf[..n].iter().position(|&b| b == 0x1d) {
            to_vm.write_all(&buf[..i])?;
            return Ok(());
        }
        to_vm.write_all(&buf[..n])?;
    }
}

/// Puts the terminal in raw mode and restores it on drop.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    fn enter() -> CliResult<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).map_err(std::io::Error::from)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).map_err(std::io::Error::from)?;
        Ok(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}
