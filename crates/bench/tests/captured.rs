//! The verdicts on logs captured from real bench runs: a green run, a
//! failing one (the C reference's coherent run, gated), one whose guest
//! crashed mid-suite, and one whose stream was cut short.

use dmirror_bench::stream;
use dmirror_bench::verdict::{self, Summary};
use std::path::{Path, PathBuf};
use std::process::Command;

fn data(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(case)
}

fn judge(case: &str) -> Summary {
    let dir = data(case);
    let stream_text = std::fs::read_to_string(dir.join("stream.log")).unwrap();
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap();
    verdict::judge(&stream::parse(&stream_text), &console)
}

fn suite<'a>(s: &'a Summary, name: &str) -> &'a verdict::SuiteVerdict {
    s.suites.iter().find(|x| x.name == name).unwrap_or_else(|| panic!("no suite {name}"))
}

/// Runs the binary's `judge` on a copy of a captured run; returns its exit
/// code and what it printed.
fn judge_binary(case: &str) -> (i32, String) {
    let tmp = std::env::temp_dir().join(format!("dmirror-bench-test-{case}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for f in ["stream.log", "console.log"] {
        std::fs::copy(data(case).join(f), tmp.join(f)).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dmirror-bench")).arg("judge").arg(&tmp).output().unwrap();
    assert!(tmp.join("summary.json").exists());
    std::fs::remove_dir_all(&tmp).unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn last_line(text: &str) -> &str {
    text.lines().last().unwrap_or("")
}

#[test]
fn good_run_passes() {
    let s = judge("good");
    assert!(s.ok && s.done);
    assert_eq!(s.kernel.as_deref(), Some("7.3.4-dmirror+"));
    assert_eq!((suite(&s, "dmirror-load").passed, suite(&s, "dmirror-load").failed), (5, 0));
    // The canary's warning was caught and is expected.
    assert_eq!(suite(&s, "canary").findings.len(), 1);
    assert!(suite(&s, "canary").ok());
    let (code, out) = judge_binary("good");
    assert_eq!(code, 0);
    assert_eq!(last_line(&out), "9 passed, 0 failed, 0 skipped");
}

#[test]
fn failing_run_fails_with_counts_and_findings() {
    let s = judge("failing");
    assert!(!s.ok);
    let r = suite(&s, "hmm-tests-c");
    // 39 private + 30 coherent cases pass, 9 coherent fail, plus the log check.
    assert_eq!((r.passed, r.failed, r.skipped), (69, 10, 0));
    assert!(r.findings.iter().any(|f| f.kind == "WARNING"));
    assert!(r.findings.iter().any(|f| f.kind == "BUG" && f.line.contains("NULL pointer")));
    // What `regress` restates at the end of `make test`: the ten, by suite and name.
    let failures: Vec<_> = s.gated_failures().collect();
    assert_eq!(failures.len(), 10);
    assert!(failures.iter().all(|(suite, _)| *suite == "hmm-tests-c"));
    assert!(failures.iter().any(|(_, t)| t.name == "hmm.hmm_device_coherent.migrate_multiple"));
    let (code, out) = judge_binary("failing");
    assert_eq!(code, 1);
    assert_eq!(last_line(&out), "70 passed, 10 failed, 0 skipped");
    assert!(out.contains("migrate_to_device") || out.contains("memremap_pages"), "context printed");
}

#[test]
fn crashed_guest_fails_and_reports_the_oops() {
    let s = judge("crashed");
    assert!(!s.ok && !s.done);
    let r = suite(&s, "hmm-tests-c");
    assert_eq!(r.rc, None);
    // 52 results came; the other 26 of the plan never did.
    assert_eq!(r.passed, 52);
    assert!(r.tests.iter().filter(|t| t.outcome == dmirror_bench::ktap::Outcome::Crash).count() >= 26);
    assert!(r.findings.iter().any(|f| f.line.contains("NULL pointer dereference")));
    assert!(s.suites.iter().any(|x| x.name == "bench" && x.failed == 1));
    assert_eq!(judge_binary("crashed").0, 1);
}

#[test]
fn truncated_stream_fails() {
    let s = judge("truncated");
    assert!(!s.ok && !s.done);
    let r = suite(&s, "dmirror-load");
    assert_eq!(r.rc, None);
    // Four KTAP results and a clean log; the missing END is the failure.
    assert_eq!(r.passed, 5);
    assert!(r.failed >= 1);
    assert_eq!(judge_binary("truncated").0, 1);
}
