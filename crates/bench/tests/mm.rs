//! `dmirror-bench mm` on the mm selftests of a real pair of runs (`make test`: plan `mm` on the
//! patched kernel, `mm-stock` on stock; their stream.log without the per-case marks the suite
//! writes into the kernel log), and on copies doctored to regress.

use std::path::{Path, PathBuf};
use std::process::Command;

fn data(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(case)
}

/// Copies a captured run into `to`, passing its stream through `edit`.
fn copy_run(case: &str, to: &Path, edit: impl Fn(&str) -> String) {
    std::fs::create_dir_all(to).unwrap();
    let stream = std::fs::read_to_string(data(case).join("stream.log")).unwrap();
    std::fs::write(to.join("stream.log"), edit(&stream)).unwrap();
    std::fs::copy(data(case).join("console.log"), to.join("console.log")).unwrap();
}

/// Runs `dmirror-bench mm` on the two runs with the project's known-failures file; returns its
/// exit code, what it printed and the table it wrote.
fn compare(tag: &str, patched: impl Fn(&str) -> String, known: &str) -> (i32, String, String) {
    let tmp = std::env::temp_dir().join(format!("dmirror-bench-mm-{tag}-{}", std::process::id()));
    let (p, s) = (tmp.join("20261205-000000-mm"), tmp.join("20261205-000000-mm-stock"));
    copy_run("mm-test", &p, patched);
    copy_run("mm-stock", &s, |t| t.to_string());
    let known_file = tmp.join("known");
    std::fs::write(&known_file, known).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dmirror-bench"))
        .arg("mm")
        .arg(&p)
        .arg(&s)
        .arg("--known")
        .arg(&known_file)
        .output()
        .unwrap();
    let table = std::fs::read_to_string(p.join("mm-selftests.md")).unwrap_or_default();
    assert!(p.join("mm-selftests.json").exists() || table.is_empty());
    std::fs::remove_dir_all(&tmp).unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), table)
}

fn project_known() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../qemu/mm-selftests.known")).unwrap()
}

fn summary(out: &str) -> &str {
    out.lines().find(|l| l.starts_with("mm-selftests: ") && l.contains(" cases, ")).unwrap_or("")
}

#[test]
fn captured_pair_is_green() {
    let (rc, out, table) = compare("green", |t| t.to_string(), &project_known());
    assert_eq!(rc, 0, "{out}");
    assert!(summary(&out).ends_with(", 0 regressions"), "{out}");
    assert!(out.lines().last() == Some("mm-selftests: PASS"), "{out}");
    // One row per case, with both columns.
    assert!(table.contains("| cow.Basic COW after fork() ... with base page | pass | pass | pass both |"), "{table}");
    assert!(table.lines().filter(|l| l.starts_with("| ")).count() > 500, "{table}");
}

#[test]
fn a_case_failing_patched_only_is_a_regression() {
    let (rc, out, table) = compare(
        "regress",
        |t| t.replacen("    ok 1 Basic COW after fork() ... with base page", "    not ok 1 Basic COW after fork() ... with base page", 1),
        &project_known(),
    );
    assert_eq!(rc, 1, "{out}");
    assert!(summary(&out).ends_with(", 1 regressions"), "{out}");
    assert!(table.contains("| cow.Basic COW after fork() ... with base page | pass | FAIL | REGRESSION"), "{table}");
}

#[test]
fn a_failure_on_both_needs_a_reason() {
    // Without the project's reasons, the cases that fail on both are unexplained.
    let (rc, out, _) = compare("unexplained", |t| t.to_string(), "");
    let line = summary(&out);
    if line.contains(" 0 fail both") {
        assert_eq!(rc, 0, "{out}");
    } else {
        assert_eq!(rc, 1, "{out}");
        assert!(line.contains("without a reason"), "{out}");
    }
}

#[test]
fn a_patched_program_dying_midway_is_caught() {
    // The patched run's cow program stops after its first case: the rest never came.
    let (rc, out, _) = compare(
        "crash",
        |t| {
            let first = t.find("    ok 1 Basic COW after fork() ... with base page\n").expect("cow's first case");
            let start = first + t[first..].find("    ok 2 ").expect("cow's second case");
            let end = start + t[start..].find("# mm-selftests: cow exit").expect("cow's end");
            let rest = &t[end..];
            let nl = rest.find('\n').expect("cow's exit line") + 1;
            // The program's own result line, from its exit status.
            let result = &rest[nl..];
            assert!(result.starts_with("ok ") && result[..result.find('\n').unwrap()].ends_with(" cow"));
            format!("{}Segmentation fault\n# mm-selftests: cow exit 139\nnot {result}", &t[..start])
        },
        &project_known(),
    );
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("REGRESSION"), "{out}");
}
