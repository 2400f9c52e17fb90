//! The control socket between umlctl commands and a VM's supervisor
//! (`run/control.sock`, a unix stream socket, mode 0600). A client sends one
//! JSON request line and reads one JSON reply line; `console` then turns the
//! connection into a raw byte stream to and from the guest's console.

use super::state::Vm;
use crate::exit::{fail, CliError, CliResult, Code};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Answer once the guest's exec agent is up, or the boot failed.
    WaitReady { timeout_ms: u64 },
    /// Run argv in the guest.
    Exec {
        argv: Vec<String>,
        timeout_ms: Option<u64>,
    },
    /// Attach to the console.
    Console,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Exec: the command's exit status, and its output in base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_b64: Option<String>,
}

impl Reply {
    pub fn err(msg: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(msg.into()),
            ..Reply::default()
        }
    }
}

/// Connects to a running VM's supervisor.
pub fn connect(vm: &Vm) -> CliResult<UnixStream> {
    UnixStream::connect(vm.control_socket()).map_err(|_| not_running(vm))
}

pub fn not_running(vm: &Vm) -> CliError {
    CliError::new(
        Code::Conflict,
        format!(
            "VM {0} is not running: start it with `umlctl vm start {0}`",
            vm.name()
        ),
    )
}

/// Waits for the supervisor's socket to appear (it creates it once UML
/// runs); None if the supervisor ended or took more than 10 s.
pub fn connect_when_up(vm: &Vm, mut supervisor_alive: impl FnMut() -> bool) -> Option<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = UnixStream::connect(vm.control_socket()) {
            return Some(s);
        }
        if !supervisor_alive() || Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one request and reads one reply on an open connection.
pub fn call_on(stream: &UnixStream, req: &Request) -> CliResult<Reply> {
    let mut line = serde_json::to_string(req).expect("serializable request");
    line.push('\n');
    (&*stream).write_all(line.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    if answer.is_empty() {
        return fail(
            Code::Internal,
            "the VM's supervisor closed the connection (did the VM stop?)",
        );
    }
    serde_json::from_str(&answer).map_err(|e| {
        CliError::new(
            Code::Internal,
            format!("bad reply from the supervisor: {e}"),
        )
    })
}

/// Sends one request to a running VM.
pub fn call(vm: &Vm, req: &Request) -> CliResult<Reply> {
    let stream = connect(vm)?;
    call_on(&stream, req)
}

/// The result of a command run in a guest.
pub struct ExecOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs argv in the guest through its exec agent.
pub fn exec(vm: &Vm, argv: &[String], timeout: Option<Duration>) -> CliResult<ExecOutput> {
    use base64::Engine;
    let reply = call(
        vm,
        &Request::Exec {
            argv: argv.to_vec(),
            timeout_ms: timeout.map(|t| t.as_millis() as u64),
        },
    )?;
    if !reply.ok {
        return fail(
            Code::Internal,
            format!(
                "exec in VM {}: {}",
                vm.name(),
                reply.error.unwrap_or_default()
            ),
        );
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let decode = |s: Option<String>| b64.decode(s.unwrap_or_default()).unwrap_or_default();
    Ok(ExecOutput {
        status: reply.status.unwrap_or(-1),
        stdout: decode(reply.stdout_b64),
        stderr: decode(reply.stderr_b64),
    })
}

/// Quotes argv into one POSIX shell command line.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        let argv = vec!["sh".to_string(), "-c".into(), "echo 'a b'; exit 3".into()];
        assert_eq!(shell_join(&argv), r#"'sh' '-c' 'echo '\''a b'\''; exit 3'"#);
    }

    #[test]
    fn request_wire_format() {
        let r = serde_json::to_string(&Request::WaitReady { timeout_ms: 5 }).unwrap();
        assert_eq!(r, r#"{"op":"wait_ready","timeout_ms":5}"#);
    }
}
