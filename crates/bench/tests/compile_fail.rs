//! The compile-fail suite end to end, with a stand-in for the kernel's make, and its merge into
//! a saved run's summary by `judge`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A stand-in for `make -C KDIR ... M=DIR modules`: the misuse build (its Kbuild sets the cfg)
/// fails with E0308 located in the case's file, the control builds. It fails without the make
/// argument the suite must pass through.
const FAKE_MAKE: &str = r#"#!/usr/bin/env bash
set -euo pipefail
dir=
llvm=
for a in "$@"; do
	case "$a" in
	M=*) dir=${a#M=} ;;
	LLVM=-22) llvm=1 ;;
	esac
done
if [ -z "$llvm" ]; then
	echo "make: LLVM=-22 was not passed"
	exit 2
fi
name=$(sed -n 's/^obj-m := \(.*\)\.o$/\1/p' "$dir/Kbuild")
echo "  RUSTC [M] $dir/$name.o"
if grep -q -- '--cfg dmirror_compile_fail' "$dir/Kbuild"; then
	echo "error[E0308]: mismatched types"
	echo "  --> $dir/$name.rs:9:43"
	echo "   |"
	echo "   = expected \`usize\`, found \`&str\`"
	echo
	echo "error: aborting due to 1 previous error"
	echo "make[3]: *** [scripts/Makefile.build:317: $dir/$name.o] Error 1"
	exit 2
fi
echo "  LD [M]  $dir/$name.ko"
"#;

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dmirror-cf-{test}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `text` to `path`, creating its directory.
fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

#[test]
fn runner_judges_each_case_and_writes_ktap() {
    let tmp = scratch("runner");
    let make = tmp.join("fake-make");
    write(&make, FAKE_MAKE);
    fs::set_permissions(&make, fs::Permissions::from_mode(0o755)).unwrap();
    let cases = tmp.join("cases");
    write(
        &cases.join("good.rs"),
        "// SPDX-License-Identifier: GPL-2.0\n// expect: E0308\n// expect-msg: found `&str`\nuse x;\n",
    );
    write(&cases.join("wrong_code.rs"), "// expect: E0599\nuse x;\n");
    write(&cases.join("no_header.rs"), "use x;\n");
    write(&cases.join("notes.txt"), "not a case\n");
    let out = tmp.join("out");
    // A stale KTAP file of an earlier run must not survive.
    write(&out.join("compile-fail.ktap"), "1..1\nok 1 stale\n");
    let run = Command::new(env!("CARGO_BIN_EXE_dmirror-bench"))
        .arg("compile-fail")
        .args(["--kdir", "/nonexistent-kdir", "--jobs", "3", "--make"])
        .arg(&make)
        .arg("--cases")
        .arg(&cases)
        .arg("--out")
        .arg(&out)
        .args(["--", "LLVM=-22", "RUSTC=/usr/bin/rustc"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(1), "{stdout}");
    let ktap = fs::read_to_string(out.join("compile-fail.ktap")).unwrap();
    assert_eq!(
        ktap,
        "KTAP version 1\n\
         # compile-fail: each misuse must fail with its error code, each control must build\n\
         1..3\n\
         ok 1 good\n\
         # no_header: bad case: no `// expect: EXXXX` line in the header comment\n\
         not ok 2 no_header\n\
         # wrong_code: failed with E0308, expected E0599\n\
         not ok 3 wrong_code\n"
    );
    assert!(
        stdout.contains("compile-fail: ok   good        misuse failed with E0308, control built"),
        "{stdout}"
    );
    assert!(
        stdout.contains("compile-fail: FAIL wrong_code  failed with E0308, expected E0599"),
        "{stdout}"
    );
    assert!(
        stdout.contains("compile-fail: 1 passed, 2 failed"),
        "{stdout}"
    );
    // Each build in its own directory, with its Kbuild and its log.
    let fail_kbuild = fs::read_to_string(out.join("good/fail/Kbuild")).unwrap();
    assert!(fail_kbuild.contains("--cfg dmirror_compile_fail"));
    let control_kbuild = fs::read_to_string(out.join("good/control/Kbuild")).unwrap();
    assert!(!control_kbuild.contains("--cfg dmirror_compile_fail"));
    let log = fs::read_to_string(out.join("good/control/build.log")).unwrap();
    assert!(log.contains("LD [M]"));
    fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn runner_without_cases_is_an_error() {
    let tmp = scratch("empty");
    fs::create_dir_all(tmp.join("cases")).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_dmirror-bench"))
        .arg("compile-fail")
        .args(["--kdir", "/k", "--make", "/bin/false"])
        .arg("--cases")
        .arg(tmp.join("cases"))
        .arg("--out")
        .arg(tmp.join("out"))
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("no case"));
    fs::remove_dir_all(&tmp).unwrap();
}

/// `judge` on a copy of the captured green run with a compile-fail KTAP listed in its
/// `host-suites`: the suite is in summary.json, gated, and counted in the last line.
#[test]
fn judge_merges_the_host_suite() {
    let tmp = scratch("judge");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/good");
    for f in ["stream.log", "console.log"] {
        fs::copy(data.join(f), tmp.join(f)).unwrap();
    }
    write(&tmp.join("host-suites"), "compile-fail\n");
    write(
        &tmp.join("compile-fail.ktap"),
        "KTAP version 1\n1..2\nok 1 a\n# b: misuse compiled\nnot ok 2 b\n",
    );
    let judge = || {
        let out = Command::new(env!("CARGO_BIN_EXE_dmirror-bench"))
            .arg("judge")
            .arg(&tmp)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, stdout) = judge();
    assert_eq!(code, Some(1));
    // The captured run alone is "9 passed, 0 failed, 0 skipped".
    assert_eq!(
        stdout.lines().last(),
        Some("10 passed, 1 failed, 0 skipped")
    );
    assert!(
        stdout.contains("compile-fail: failed\n  b misuse compiled\n"),
        "{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(tmp.join("summary.json")).unwrap()).unwrap();
    let suite = &summary["suites"][0];
    assert_eq!(suite["name"], "compile-fail");
    assert_eq!(
        (suite["gated"].as_bool(), suite["host"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(
        (suite["passed"].as_u64(), suite["failed"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(suite["tests"][1]["note"], "misuse compiled");
    assert_eq!(summary["gated"]["failed"], 1);
    assert_eq!(summary["ok"], false);
    // Listed but missing: the suite fails.
    fs::remove_file(tmp.join("compile-fail.ktap")).unwrap();
    let (code, stdout) = judge();
    assert_eq!(code, Some(1));
    assert_eq!(stdout.lines().last(), Some("9 passed, 1 failed, 0 skipped"));
    fs::remove_dir_all(&tmp).unwrap();
}
