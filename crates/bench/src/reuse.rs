//! Reusing a finished boot whose inputs have not changed (`run --reuse`).
//!
//! A boot's outcome is a function of what went into it: the kernel image, the initramfs, the
//! command line and the machine. `make test` boots the kernel's mm selftests (no dmirror in
//! them) and the stock kernel each time, although after a change to the driver alone none of
//! their inputs differ. With `--reuse`, `run` hashes those inputs into a key, writes it into the
//! run's directory (`reuse.key`), and before booting looks for the newest earlier run of the
//! same plan with the same key whose guest finished its plan; if there is one, that run's
//! results stand for this one, and the run says so.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The file in a run's directory that holds its key.
pub const KEY_FILE: &str = "reuse.key";

/// The SHA-256 sums, in hex, that `sha256sum` (coreutils) prints for `files` (each file's
/// contents) or, with no files, for `stdin`.
fn sha256sum(files: &[&Path], stdin: &[u8]) -> Result<Vec<String>, String> {
    let mut child = Command::new("sha256sum")
        .args(files)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("sha256sum: {e}"))?;
    // sha256sum reads all of its input before it writes: no deadlock on the two pipes.
    let mut input = child.stdin.take().ok_or("sha256sum: no stdin")?;
    if files.is_empty() {
        input.write_all(stdin).map_err(|e| format!("sha256sum: {e}"))?;
    }
    drop(input);
    let out = child.wait_with_output().map_err(|e| format!("sha256sum: {e}"))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(format!("sha256sum {files:?}: {}: {}", out.status, why.trim()));
    }
    let sums: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    if sums.len() != files.len().max(1) || sums.iter().any(|h| h.len() != 64) {
        return Err(format!("sha256sum {files:?}: unexpected output"));
    }
    Ok(sums)
}

/// The key of a boot: each of `parts` (the command line, the machine, ...) and the contents of
/// each of `files` (the kernel image, the initramfs).
pub fn key(parts: &[String], files: &[&Path]) -> Result<String, String> {
    let mut all = Vec::new();
    for p in parts {
        all.extend_from_slice(p.as_bytes());
        all.push(b'\n');
    }
    if !files.is_empty() {
        for sum in sha256sum(files, &[])? {
            all.extend_from_slice(sum.as_bytes());
            all.push(b'\n');
        }
    }
    Ok(sha256sum(&[], &all)?.remove(0))
}

/// Whether `name` is the directory name of a run of `plan`: `YYYYmmdd-HHMMSS-<plan>`.
fn is_run_of(name: &str, plan: &str) -> bool {
    name.len() == 16 + plan.len()
        && name.as_bytes()[15] == b'-'
        && name[..15].bytes().enumerate().all(|(i, b)| if i == 8 { b == b'-' } else { b.is_ascii_digit() })
        && name.ends_with(plan)
}

/// The newest run of `plan` below `results` with `key` that `finished` accepts, if any.
pub fn find(results: &Path, plan: &str, key: &str, finished: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let mut runs: Vec<String> = fs::read_dir(results)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_run_of(n, plan))
        .collect();
    runs.sort();
    runs.into_iter().rev().map(|n| results.join(n)).find(|dir| {
        fs::read_to_string(dir.join(KEY_FILE)).is_ok_and(|k| k.trim() == key) && finished(dir)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dmirror-reuse-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn key_follows_every_input() {
        let d = tmp("key");
        let (a, b) = (d.join("a"), d.join("b"));
        fs::write(&a, "kernel").unwrap();
        fs::write(&b, "initrd").unwrap();
        let parts = vec!["console=ttyS0 dmirror.plan=mm".to_string(), "smp 3".to_string()];
        let k = key(&parts, &[&a, &b]).unwrap();
        assert_eq!(k.len(), 64);
        assert_eq!(k, key(&parts, &[&a, &b]).unwrap());
        assert_ne!(k, key(&parts, &[&b, &a]).unwrap());
        assert_ne!(k, key(&parts[..1], &[&a, &b]).unwrap());
        fs::write(&b, "initrd2").unwrap();
        assert_ne!(k, key(&parts, &[&a, &b]).unwrap());
        let e = key(&parts, &[&d.join("missing")]).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn find_takes_the_newest_finished_run_of_the_plan_with_the_key() {
        let d = tmp("find");
        let mk = |name: &str, key: &str, done: bool| {
            let r = d.join(name);
            fs::create_dir_all(&r).unwrap();
            fs::write(r.join(KEY_FILE), format!("{key}\n")).unwrap();
            if done {
                fs::write(r.join("done"), "").unwrap();
            }
        };
        mk("20261201-100000-mm", "k1", true);
        mk("20261202-100000-mm", "k1", true);
        mk("20261203-100000-mm", "k1", false);
        mk("20261204-100000-mm", "k2", true);
        mk("20261205-100000-mm-stock", "k1", true);
        let finished = |p: &Path| p.join("done").exists();
        let found = find(&d, "mm", "k1", finished).unwrap();
        assert!(found.ends_with("20261202-100000-mm"), "{}", found.display());
        let found = find(&d, "mm-stock", "k1", finished).unwrap();
        assert!(found.ends_with("20261205-100000-mm-stock"));
        assert!(find(&d, "mm", "k3", finished).is_none());
        assert!(find(&d, "stock", "k1", finished).is_none());
        assert!(find(&d.join("nothing"), "mm", "k1", finished).is_none());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn run_names() {
        assert!(is_run_of("20261205-203000-mm", "mm"));
        assert!(!is_run_of("20261205-203000-mm-stock", "mm"));
        assert!(!is_run_of("latest-mm", "mm"));
        assert!(!is_run_of("2026120x-203000-mm", "mm"));
    }
}
