//! Which QEMU accelerator a run uses: TCG (the default, works everywhere), KVM, or KVM where a
//! probe boot shows it works.
//!
//! On some hosts `/dev/kvm` exists but nested KVM hangs or stops with "KVM internal error", so
//! `auto` never trusts the device file alone: it boots the run's kernel under KVM with no
//! initramfs and a short deadline. A kernel that gets as far as its "no root" panic has run;
//! anything else (a hang, an error, no panic line) means TCG.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// What `--accel` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Tcg,
    Kvm,
    Auto,
}

impl Choice {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "tcg" => Ok(Choice::Tcg),
            "kvm" => Ok(Choice::Kvm),
            "auto" => Ok(Choice::Auto),
            _ => Err(format!("--accel {s}: want tcg, kvm or auto")),
        }
    }
}

/// The accelerator a run uses, and QEMU's `-accel` and `-cpu` values for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    pub fn qemu_args(self) -> (&'static str, &'static str) {
        match self {
            Accel::Tcg => ("tcg,thread=multi", "max"),
            Accel::Kvm => ("kvm", "host"),
        }
    }
}

/// How long the probe boot may take: a kernel reaches its root-mount panic in well under a
/// second under KVM; a hung nested KVM never does.
const PROBE_SECS: u64 = 20;

/// Resolves `choice` for `kernel`: `auto` probes, printing what it found and why.
pub fn resolve(choice: Choice, qemu: &str, kernel: &Path, scratch: &Path) -> Accel {
    match choice {
        Choice::Tcg => Accel::Tcg,
        Choice::Kvm => Accel::Kvm,
        Choice::Auto => match probe(qemu, kernel, scratch) {
            Ok(()) => {
                println!("bench: accel auto: a probe boot under KVM reached the kernel's panic: using KVM");
                Accel::Kvm
            }
            Err(why) => {
                println!("bench: accel auto: {why}: using TCG");
                Accel::Tcg
            }
        },
    }
}

/// Boots `kernel` under KVM without an initramfs; `Ok` if it panicked on the missing root in
/// time, the reason otherwise.
fn probe(qemu: &str, kernel: &Path, scratch: &Path) -> Result<(), String> {
    if fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return Err("/dev/kvm cannot be opened".into());
    }
    let log = scratch.join("accel-probe.log");
    let _ = fs::remove_file(&log);
    let mut child = Command::new(qemu)
        .args(["-nodefaults", "-no-user-config", "-no-reboot", "-display", "none"])
        .args(["-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "256M"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 root=/dev/dmirror-probe-none"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{qemu}: {e}"))?;
    let start = Instant::now();
    let exited = loop {
        match child.try_wait() {
            Ok(Some(_)) => break true,
            Ok(None) if start.elapsed() < Duration::from_secs(PROBE_SECS) => {
                std::thread::sleep(Duration::from_millis(100));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break false;
            }
        }
    };
    let console = fs::read_to_string(&log).unwrap_or_default();
    let _ = fs::remove_file(&log);
    judge_probe(exited, &console)
}

/// The probe's verdict from whether QEMU exited in time and what the console shows.
fn judge_probe(exited: bool, console: &str) -> Result<(), String> {
    if !console.contains("Kernel panic") {
        return Err(if exited {
            "the probe boot under KVM ended before the kernel's panic".into()
        } else {
            format!("the probe boot under KVM did not reach the kernel's panic in {PROBE_SECS} s")
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices() {
        assert_eq!(Choice::parse("tcg"), Ok(Choice::Tcg));
        assert_eq!(Choice::parse("kvm"), Ok(Choice::Kvm));
        assert_eq!(Choice::parse("auto"), Ok(Choice::Auto));
        assert!(Choice::parse("hvf").is_err());
        assert_eq!(Accel::Tcg.qemu_args(), ("tcg,thread=multi", "max"));
        assert_eq!(Accel::Kvm.qemu_args().0, "kvm");
    }

    #[test]
    fn probe_verdicts() {
        let panic = "[    0.9] Kernel panic - not syncing: VFS: Unable to mount root fs\n";
        assert!(judge_probe(true, panic).is_ok());
        // Killed after the panic line was written: the kernel ran.
        assert!(judge_probe(false, panic).is_ok());
        assert!(judge_probe(false, "").unwrap_err().contains("did not reach"));
        assert!(judge_probe(true, "KVM internal error").unwrap_err().contains("ended before"));
    }

    #[test]
    fn fixed_choices_do_not_probe() {
        // A kernel path that does not exist: a probe would fail, a fixed choice never looks.
        let k = Path::new("/nonexistent/bzImage");
        assert_eq!(resolve(Choice::Tcg, "/bin/false", k, Path::new("/tmp")), Accel::Tcg);
        assert_eq!(resolve(Choice::Kvm, "/bin/false", k, Path::new("/tmp")), Accel::Kvm);
    }
}
