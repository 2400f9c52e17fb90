//! The host-only network for VMs created with `--net`. Nothing on it can
//! leave the machine: it is a bridge inside a network namespace of ours,
//! joined to the host by one veth pair, with no route, NAT or forwarding out.
//!
//! ```text
//! host (root namespace)          namespace "umlctl"
//!   umlctl0 10.213.0.1/24 ── veth ── umlctl0p ─┐
//!                                   umltapN ──┤ bridge umlbr0
//!   (UML of VM N runs in the        umltapM ──┘
//!    namespace and opens its tap)
//! ```
//! Guests get 10.213.0.10 to .250 and no default route, so they reach each
//! other and the host, and nothing else. Each VM's tap is made when it starts
//! and deleted when it stops; the namespace goes with the last tap.

use super::state::Store;
use crate::exit::{fail, CliError, CliResult, Code};
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::path::Path;
use std::process::Command;

pub const NETNS: &str = "umlctl";
const BRIDGE: &str = "umlbr0";
const HOST_IF: &str = "umlctl0";
const PEER_IF: &str = "umlctl0p";
const SUBNET: &str = "10.213.0";
pub const HOST_IP: &str = "10.213.0.1";
pub const PREFIX_LEN: u8 = 24;
const FIRST_GUEST: u8 = 10;
const LOCK_FILE: &str = "/run/umlctl-net.lock";
const LAST_GUEST: u8 = 250;

/// Runs `ip ARGS`, failing with its message.
fn ip(args: &[&str]) -> CliResult {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| CliError::new(Code::Environment, format!("cannot run ip (iproute2): {e}")))?;
    if !out.status.success() {
        return fail(
            Code::Environment,
            format!(
                "ip {} failed: {} (the VM network needs root and /dev/net/tun)",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        );
    }
    Ok(())
}

fn netns_path() -> String {
    format!("/run/netns/{NETNS}")
}

/// Serialises network set-up and tear-down between umlctl processes (of
/// any VM directory: the network is one per host).
fn lock() -> CliResult<Flock<File>> {
    let f = File::create(LOCK_FILE).map_err(|e| {
        CliError::new(
            Code::Environment,
            format!("cannot create {LOCK_FILE}: {e} (the VM network needs root)"),
        )
    })?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| CliError::new(Code::Internal, format!("locking the VM network: {e}")))
}

/// Creates the namespace, bridge and veth pair unless they exist.
fn ensure() -> CliResult {
    if Path::new(&netns_path()).exists() {
        return Ok(());
    }
    ip(&["netns", "add", NETNS])?;
    let n = ["-n", NETNS];
    let steps: Vec<Vec<&str>> = vec![
        vec!["link", "set", "lo", "up"],
        vec!["link", "add", BRIDGE, "type", "bridge"],
        vec!["link", "set", BRIDGE, "up"],
    ];
    for s in steps {
        ip(&[&n[..], &s[..]].concat())?;
    }
    ip(&[
        "link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF, "netns", NETNS,
    ])?;
    ip(&["-n", NETNS, "link", "set", PEER_IF, "master", BRIDGE, "up"])?;
    let host_cidr = format!("{HOST_IP}/{PREFIX_LEN}");
    ip(&["addr", "add", &host_cidr, "dev", HOST_IF])?;
    ip(&["link", "set", HOST_IF, "up"])
}

/// Makes the tap for a VM with address `guest_ip` (run before UML starts)
/// and returns its name.
pub fn attach(guest_ip: &str) -> CliResult<String> {
    let _guard = lock()?;
    ensure()?;
    let tap = tap_name(guest_ip);
    if taps()?.contains(&tap) {
        return fail(
            Code::Conflict,
            format!("address {guest_ip} is in use by another running VM (its tap {tap} exists)"),
        );
    }
    ip(&["-n", NETNS, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
    ip(&["-n", NETNS, "link", "set", &tap, "master", BRIDGE, "up"])?;
    Ok(tap)
}

/// Deletes a VM's tap, and the whole network when it was the last one: a
/// host with no running networked VM has no trace of it.
pub fn detach(tap: &str) {
    let Ok(_guard) = lock() else { return };
    if !Path::new(&netns_path()).exists() {
        return;
    }
    let _ = Command::new("ip")
        .args(["-n", NETNS, "link", "del", tap])
        .output();
    if taps().is_ok_and(|t| t.is_empty()) {
        // Deleting one end of the veth pair deletes both; the bridge goes
        // with the namespace (whose teardown the kernel finishes later).
        let _ = Command::new("ip").args(["link", "del", HOST_IF]).output();
        let _ = Command::new("ip").args(["netns", "del", NETNS]).output();
    }
}

/// The VM taps in the namespace.
fn taps() -> CliResult<Vec<String>> {
    let out = Command::new("ip")
        .args(["-n", NETNS, "-o", "link", "show"])
        .output()
        .map_err(|e| CliError::new(Code::Environment, format!("cannot run ip (iproute2): {e}")))?;
    // Lines look like "7: umltap10: <BROADCAST,...> ..." (or "umltap10@if3").
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("umltap"))
        .collect())
}

/// The namespace, for setns() before UML starts.
pub fn namespace_file() -> CliResult<File> {
    File::open(netns_path()).map_err(|e| {
        CliError::new(
            Code::Environment,
            format!("cannot open the VM network namespace {}: {e}", netns_path()),
        )
    })
}

/// The lowest free guest address, or the requested one if it is free.
pub fn allocate(store: &Store, wanted: Option<&str>) -> CliResult<String> {
    let taken: Vec<String> = store
        .all()?
        .into_iter()
        .filter_map(|vm| vm.config.ip)
        .collect();
    if let Some(w) = wanted {
        let ok = w
            .strip_prefix(&format!("{SUBNET}."))
            .and_then(|o| o.parse::<u8>().ok())
            .is_some_and(|o| (FIRST_GUEST..=LAST_GUEST).contains(&o));
        if !ok {
            return fail(
                Code::Usage,
                format!("--ip {w} is not on the VM network: use {SUBNET}.{FIRST_GUEST} to {SUBNET}.{LAST_GUEST}"),
            );
        }
        if taken.iter().any(|t| t == w) {
            return fail(
                Code::Conflict,
                format!("address {w} is taken by another VM"),
            );
        }
        return Ok(w.to_string());
    }
    (FIRST_GUEST..=LAST_GUEST)
        .map(|o| format!("{SUBNET}.{o}"))
        .find(|a| !taken.contains(a))
        .ok_or_else(|| CliError::new(Code::Conflict, "the VM network is full (241 addresses)"))
}

fn last_octet(ip: &str) -> u8 {
    ip.rsplit('.')
        .next()
        .and_then(|o| o.parse().ok())
        .unwrap_or(0)
}

pub fn tap_name(guest_ip: &str) -> String {
    format!("umltap{}", last_octet(guest_ip))
}

/// A fixed, locally administered MAC per address.
pub fn mac_for(guest_ip: &str) -> String {
    format!("52:54:00:d5:00:{:02x}", last_octet(guest_ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_addresses() {
        assert_eq!(tap_name("10.213.0.12"), "umltap12");
        assert_eq!(mac_for("10.213.0.255"), "52:54:00:d5:00:ff");
        assert!(tap_name("10.213.0.250").len() <= 15);
    }
}
