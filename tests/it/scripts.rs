//! The shell scripts' installer, with a stand-in `apt-get` on PATH: it says what it
//! installs before it does, installs only with `--no-upgrade`, and refuses an install that
//! would upgrade a package already on the machine.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::TempDir;

/// Runs `cb_apt_install PACKAGES` from script/lib.sh with an `apt-get` that simulates
/// `simulated` and records every call it gets in `calls`.
fn apt_install(dir: &TempDir, simulated: &str, packages: &[&str]) -> (Output, String) {
    let calls = dir.join("calls");
    let stub = dir.join("apt-get");
    std::fs::write(
        &stub,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\ncase \" $* \" in *' -s '*) printf '%s\\n' '{}' ;; esac\n",
            calls.display(),
            simulated.replace('\'', "")
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&stub)
        .status()
        .unwrap();
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("script/lib.sh");
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!(". '{}'; cb_apt_install \"$@\"", lib.display()))
        .arg("cb_apt_install")
        .args(packages)
        .env(
            "PATH",
            format!(
                "{}:{}",
                dir.path().display(),
                std::env::var("PATH").unwrap()
            ),
        )
        .output()
        .unwrap();
    let recorded = std::fs::read_to_string(&calls).unwrap_or_default();
    (output, recorded)
}

fn is_root() -> bool {
    let id = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&id.stdout).trim() == "0"
}

#[test]
fn the_installer_says_what_it_installs_and_never_upgrades() {
    let dir = TempDir::new("cloudbrain-apt");
    let (output, calls) = apt_install(
        &dir,
        "Inst wrk (4.1.0-4 Debian:12/stable [amd64])",
        &["wrk"],
    );
    let said = String::from_utf8_lossy(&output.stderr);
    if !is_root() {
        // Not root: it installs nothing and says what to install.
        assert!(!output.status.success());
        assert!(said.contains("apt-get install wrk"), "{said}");
        assert!(calls.is_empty(), "{calls}");
        return;
    }
    assert!(output.status.success(), "{said}");
    assert!(said.contains("installing Debian's wrk"), "{said}");
    let install = calls
        .lines()
        .find(|l| l.starts_with("install") && !l.contains(" -s "))
        .unwrap_or_else(|| panic!("no install: {calls}"));
    assert!(
        install.contains("--no-upgrade") && install.ends_with("wrk"),
        "{install}"
    );

    // An install that would upgrade an installed package is refused, naming it.
    let dir = TempDir::new("cloudbrain-apt");
    let (output, calls) = apt_install(
        &dir,
        "Inst libpq5 [15.18-0+deb12u1] (15.20-0+deb12u1 Debian:12/stable [amd64])",
        &["libpq-dev"],
    );
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{said}");
    assert!(
        said.contains("would upgrade installed packages: libpq5"),
        "{said}"
    );
    assert!(
        !calls
            .lines()
            .any(|l| l.starts_with("install") && !l.contains(" -s ")),
        "it installed anyway: {calls}"
    );
}
