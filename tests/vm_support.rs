//! Helpers for the UML VM tests (tests/vm_*.rs): a private VM directory with
//! a freshly built image, the real umlctl binary run against it, and a
//! clean-up that kills every VM the test left running, even on failure.
#![allow(dead_code)]

use crate::common;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// One test's VMs: their own state directory and base image.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
}

/// Whether this host can run the VM tests: root and an installed UML.
pub fn uml_ready() -> bool {
    let uml_dir = std::env::var("UMLCTL_UML_DIR").unwrap_or_else(|_| "/opt/umlctl/uml".into());
    common::is_root() && Path::new(&uml_dir).join("uml.conf").is_file()
}

impl Lab {
    /// A lab with an image built with these extra `--add HOST:GUEST` files,
    /// or None (test skipped) when the host cannot run UML.
    pub fn new(adds: &[String]) -> Option<Lab> {
        if common::skip_unless(uml_ready(), "root and a UML kernel (run tools/install-uml)") {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("umlctl-vmtest-")
            .tempdir()
            .unwrap();
        let image = dir.path().join("base.img");
        let mut lab = Lab {
            dir,
            image: image.clone(),
        };
        let mut args = vec![
            "vm".to_string(),
            "image".into(),
            "build".into(),
            "--size".into(),
            "64M".into(),
        ];
        args.extend(["--out".to_string(), image.to_string_lossy().into_owned()]);
        for a in adds {
            args.extend(["--add".to_string(), a.clone()]);
        }
        lab.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        lab.image = image;
        Some(lab)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("vms")
    }

    /// Runs umlctl against this lab's VM directory.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(common::umlctl())
            .args(args)
            .env("UMLCTL_VM_DIR", self.state_dir())
            .output()
            .expect("run umlctl")
    }

    /// Runs umlctl and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "umlctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs umlctl and insists on a failure with this exit code; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "umlctl {args:?}: expected exit {code}, stderr: {err}"
        );
        err
    }

    /// `--json` output parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("umlctl --json prints JSON")
    }

    /// Creates and starts a VM on the lab's image.
    pub fn boot(&self, name: &str, extra: &[&str]) {
        let image = self.image.to_string_lossy().into_owned();
        let mut args = vec!["vm", "create", name, "--image", &image];
        args.extend_from_slice(extra);
        self.ok(&args);
        self.ok(&["vm", "start", name]);
    }

    /// Runs a shell script in a VM; returns (status, stdout).
    pub fn sh(&self, vm: &str, script: &str) -> (i32, String) {
        let out = self.run(&[
            "vm",
            "exec",
            vm,
            "--timeout",
            "60",
            "--",
            "sh",
            "-c",
            script,
        ]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// The `vm list --json` entry of one VM.
    pub fn vm_info(&self, name: &str) -> serde_json::Value {
        let list = self.json(&["vm", "list"]);
        list.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("VM {name} not listed in {list}"))
    }

    /// Mounts under this lab (the VMs' cowfs disks while they run).
    pub fn mounts(&self) -> Vec<String> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&needle))
            .map(str::to_string)
            .collect()
    }

    /// Live (non-zombie) processes whose command line mentions this lab.
    pub fn processes(&self) -> Vec<(u32, String)> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let mut found = vec![];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z'));
            if cmd.contains(&needle) && !zombie {
                found.push((pid, cmd));
            }
        }
        found
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Ok(out) = Command::new(common::umlctl())
            .args(["--json", "vm", "list"])
            .env("UMLCTL_VM_DIR", self.state_dir())
            .output()
        {
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            for vm in list.as_array().into_iter().flatten() {
                let name = vm["name"].as_str().unwrap_or_default();
                let _ = self.run(&["vm", "rm", "--force", name]);
            }
        }
    }
}
