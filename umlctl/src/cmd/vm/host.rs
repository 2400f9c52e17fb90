//! The UML kernel on this host, as `tools/install-uml` left it: the
//! `uml.conf` file in `$UMLCTL_UML_DIR` (default /opt/umlctl/uml) names the
//! kernel binary, its mode (seccomp for 7.x, ptrace for the degraded 6.1
//! fallback), a wrapper to run it under, and settings the guest needs.

use crate::exit::{fail, CliResult, Code};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Where `tools/install-uml` installs, unless `UMLCTL_UML_DIR` says otherwise.
pub const DEFAULT_UML_DIR: &str = "/opt/umlctl/uml";

#[derive(Clone, Debug, Serialize)]
pub struct Uml {
    /// Human description of the package, e.g. "user-mode-linux 7.2um1 (...)".
    pub package: String,
    pub kernel: PathBuf,
    /// "seccomp" (UML 7.x) or "ptrace" (6.1 fallback).
    pub mode: String,
    /// A program the kernel is run under (the 6.1 xstate filter), if any.
    pub wrapper: Option<PathBuf>,
    /// KEY=VALUE settings put on the kernel command line for the guest's init.
    pub guest_env: Option<String>,
}

impl Uml {
    /// Finds the installed UML, or says how to install it.
    pub fn find() -> CliResult<Uml> {
        let dir = std::env::var_os("UMLCTL_UML_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_UML_DIR));
        let conf = dir.join("uml.conf");
        let text = match std::fs::read_to_string(&conf) {
            Ok(t) => t,
            Err(_) => {
                return fail(
                    Code::Environment,
                    format!(
                        "no UML kernel installed ({} is missing): run tools/install-uml as root",
                        conf.display()
                    ),
                )
            }
        };
        let uml = Self::parse(&text);
        if !uml.kernel.is_file() {
            return fail(
                Code::Environment,
                format!(
                    "UML kernel {} named in {} is missing: run tools/install-uml --force",
                    uml.kernel.display(),
                    conf.display()
                ),
            );
        }
        Ok(uml)
    }

    fn parse(text: &str) -> Uml {
        let get = |key: &str| {
            text.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        Uml {
            package: get("package").unwrap_or_else(|| "unknown".into()),
            kernel: get("kernel").map(PathBuf::from).unwrap_or_default(),
            mode: get("mode").unwrap_or_else(|| "seccomp".into()),
            wrapper: get("wrapper").map(PathBuf::from),
            guest_env: get("guest_env"),
        }
    }

    /// The program and leading arguments that start this kernel.
    pub fn command_prefix(&self) -> (PathBuf, Vec<String>) {
        match &self.wrapper {
            Some(w) => (w.clone(), vec![path_str(&self.kernel)]),
            None => (self.kernel.clone(), vec![]),
        }
    }

    /// Kernel arguments that select the mode.
    pub fn mode_args(&self) -> Vec<String> {
        let mut args = vec![];
        if self.mode == "seccomp" {
            args.push("seccomp=on".to_string());
        }
        if let Some(env) = &self.guest_env {
            args.push(env.clone());
        }
        args
    }
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_install_uml_conf() {
        let u = Uml::parse(
            "# c\npackage=user-mode-linux 7.2um1 (x)\nkernel=/opt/u/linux\nmode=seccomp\nwrapper=\nguest_env=\n",
        );
        assert_eq!(u.kernel, PathBuf::from("/opt/u/linux"));
        assert_eq!(u.mode, "seccomp");
        assert!(u.wrapper.is_none() && u.guest_env.is_none());
        assert_eq!(u.mode_args(), vec!["seccomp=on"]);
        let f = Uml::parse("kernel=/k\nmode=ptrace\nwrapper=/w\nguest_env=A=b,c\n");
        assert_eq!(f.command_prefix(), (PathBuf::from("/w"), vec!["/k".into()]));
        assert_eq!(f.mode_args(), vec!["A=b,c"]);
    }
}
