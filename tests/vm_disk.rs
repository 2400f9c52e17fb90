//! VM disks: copy-on-write layers over one shared read-only base, and disk
//! checkpoint and rollback, for both kinds of layer (cowfs, the default, and
//! UML's own COW file). Real UML guests through the real umlctl binary.

#[path = "common/mod.rs"]
mod common;
#[path = "vm_support.rs"]
mod vm_support;

use vm_support::Lab;

#[test]
fn cowfs_vms_from_one_base_are_isolated_and_the_base_is_unchanged() {
    vms_from_one_base("cowfs");
}

#[test]
fn uml_cow_vms_from_one_base_are_isolated_and_the_base_is_unchanged() {
    vms_from_one_base("uml-cow");
}

#[test]
fn cowfs_checkpoint_write_rollback_forgets_the_write() {
    checkpoint_write_rollback("cowfs");
}

#[test]
fn uml_cow_checkpoint_write_rollback_forgets_the_write() {
    checkpoint_write_rollback("uml-cow");
}

fn vms_from_one_base(kind: &str) {
    let Some(lab) = Lab::new(&[]) else { return };
    let base_before = std::fs::read(&lab.image).unwrap();
    lab.boot("a", &["--mem", "64M", "--disk", kind]);
    lab.boot("b", &["--mem", "64M", "--disk", kind]);
    assert_eq!(lab.vm_info("a")["disk"], kind);

    assert_eq!(lab.sh("a", "echo from-a > /root/note && sync").0, 0);
    assert_eq!(
        lab.sh("b", "echo from-b > /root/note && rm /etc/passwd && sync")
            .0,
        0
    );
    assert_eq!(lab.sh("a", "cat /root/note").1, "from-a\n");
    assert_eq!(lab.sh("b", "cat /root/note").1, "from-b\n");
    assert_eq!(
        lab.sh("a", "test -f /etc/passwd").0,
        0,
        "b's delete leaked into a"
    );
    lab.ok(&["vm", "stop", "a"]);
    lab.ok(&["vm", "stop", "b"]);

    // The writes survive a restart, and each VM pays only for its own.
    lab.ok(&["vm", "start", "a"]);
    assert_eq!(lab.sh("a", "cat /root/note").1, "from-a\n");
    lab.ok(&["vm", "stop", "a"]);
    for vm in ["a", "b"] {
        let bytes = lab.vm_info(vm)["disk_bytes"].as_u64().unwrap();
        assert!(
            bytes < 8 << 20,
            "VM {vm} disk layer is {bytes} bytes for a few small writes"
        );
    }
    assert!(
        std::fs::read(&lab.image).unwrap() == base_before,
        "the base image changed"
    );
    // Removing the VMs removes their layers (and the shared base copy).
    lab.ok(&["vm", "rm", "a"]);
    lab.ok(&["vm", "rm", "b"]);
    let left: Vec<_> = walk(&lab.state_dir());
    assert!(
        left.iter().all(|p| p.ends_with(".lock")),
        "left after rm: {left:?}"
    );
    assert!(lab.image.is_file());
}

fn checkpoint_write_rollback(kind: &str) {
    let Some(lab) = Lab::new(&[]) else { return };
    lab.boot("c", &["--disk", kind]);
    assert_eq!(lab.sh("c", "echo before > /root/kept").0, 0);
    let pid = lab.vm_info("c")["pid"].clone();

    let ck = lab.json(&["vm", "checkpoint", "c", "ck1"]);
    assert_eq!(ck["running"], true, "{ck}");
    // The VM kept running through the checkpoint: same process, still answers.
    assert_eq!(lab.vm_info("c")["pid"], pid);
    assert_eq!(lab.sh("c", "cat /root/kept").1, "before\n");

    // No `sync` here: the rollback must forget whatever the guest wrote.
    assert_eq!(
        lab.sh("c", "echo after > /root/later; echo changed > /root/kept")
            .0,
        0
    );
    let rb = lab.json(&["vm", "rollback", "c", "ck1"]);
    assert_eq!(rb["restarted"], true, "{rb}");
    assert_eq!(lab.vm_info("c")["state"], "running");
    assert_eq!(lab.sh("c", "cat /root/kept").1, "before\n");
    assert_ne!(
        lab.sh("c", "test -e /root/later").0,
        0,
        "the write after the checkpoint survived"
    );

    // Rollback works again from the same checkpoint, and on a stopped VM.
    assert_eq!(lab.sh("c", "echo again > /root/later; sync").0, 0);
    lab.ok(&["vm", "stop", "c"]);
    let rb = lab.json(&["vm", "rollback", "c", "ck1"]);
    assert_eq!(rb["restarted"], false);
    assert_eq!(lab.vm_info("c")["state"], "stopped");
    lab.ok(&["vm", "start", "c"]);
    assert_ne!(lab.sh("c", "test -e /root/later").0, 0);
    assert_eq!(lab.vm_info("c")["checkpoints"], serde_json::json!(["ck1"]));

    let err = lab.fails(&["vm", "rollback", "c", "nosuch"], 7);
    assert!(err.contains("nosuch") && err.contains("ck1"), "{err}");
    let err = lab.fails(&["vm", "checkpoint", "c", "ck1"], 6);
    assert!(err.contains("already has a checkpoint"), "{err}");
    lab.ok(&["vm", "stop", "c"]);
}

/// Every file under a directory.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().to_string_lossy().into_owned());
        }
    }
    out
}
