//! `umlctl doctor`: reports the installed UML and what works, by trying it.

#[path = "common/mod.rs"]
mod common;
#[path = "vm_support.rs"]
mod vm_support;

use std::process::Command;

fn doctor(args: &[&str], uml_dir: Option<&std::path::Path>) -> (i32, serde_json::Value) {
    let mut cmd = Command::new(common::umlctl());
    cmd.args(["--json", "doctor"]).args(args);
    if let Some(d) = uml_dir {
        cmd.env("UMLCTL_UML_DIR", d);
    }
    let out = cmd.output().unwrap();
    let report = serde_json::from_slice(&out.stdout).expect("one JSON document");
    (out.status.code().unwrap(), report)
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report}"))
}

#[test]
fn reports_the_uml_in_use_and_boots_a_guest() {
    if common::skip_unless(
        vm_support::uml_ready(),
        "root and a UML kernel (run tools/install-uml)",
    ) {
        return;
    }
    let (code, report) = doctor(&["--boot"], None);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["ok"], true);
    assert_eq!(
        report["uml"]["mode"], "seccomp",
        "UML 7.x in seccomp mode is the default"
    );
    assert!(check(&report, "uml")["detail"]
        .as_str()
        .unwrap()
        .starts_with("7."));
    let boot = check(&report, "boot");
    assert_eq!(boot["ok"], true, "{boot}");
    assert!(
        boot["detail"].as_str().unwrap().contains("Linux 7."),
        "{boot}"
    );
    for name in ["ptrace", "userfaultfd", "fuse", "tun", "namespaces"] {
        assert!(check(&report, name)["ok"].is_boolean());
    }
    // tools/setup turns FUSE over io_uring on; doctor mounts with it.
    let uring = check(&report, "fuse-io-uring");
    assert_eq!(uring["ok"], common::fuse_io_uring_on(), "{uring}");
    // A measured figure, and ok exactly when it is small.
    let wakeup = check(&report, "cpu-wakeup");
    let detail = wakeup["detail"].as_str().unwrap();
    if let Some(rest) = detail.split("takes ").nth(1) {
        let us: f64 = rest.split(' ').next().unwrap().parse().unwrap();
        assert!(us > 0.0, "{wakeup}");
        assert_eq!(wakeup["ok"], us <= 15.0, "{wakeup}");
    } else {
        assert_eq!(detail, "one CPU: no cross-CPU wakeups", "{wakeup}");
    }
}

#[test]
fn says_when_uml_is_missing() {
    let empty = tempfile::tempdir().unwrap();
    let (code, report) = doctor(&[], Some(empty.path()));
    assert_eq!(code, 8, "{report}");
    assert_eq!(report["ok"], false);
    let uml = check(&report, "uml");
    assert_eq!(uml["ok"], false);
    assert!(
        uml["detail"]
            .as_str()
            .unwrap()
            .contains("tools/install-uml"),
        "{uml}"
    );
}
