//! Turns the guest's stream into per-suite verdicts and the run's summary.

use crate::dmesg::{self, Finding};
use crate::ktap::{self, Outcome, TestResult};
use crate::stream::Stream;
use serde::Serialize;

/// The exit status of a suite the guest's runner killed at its time limit (128 + SIGKILL).
const RC_KILLED: i32 = 137;

/// The verdict on one suite.
#[derive(Clone, Debug, Serialize)]
pub struct SuiteVerdict {
    /// The suite's name.
    pub name: String,
    /// Whether it gates the run.
    pub gated: bool,
    /// Whether it ran on the host before the guest booted (the compile-fail suite).
    pub host: bool,
    /// Whether it was meant to cause kernel reports.
    pub expect_findings: bool,
    /// Its exit status, if it finished.
    pub rc: Option<i32>,
    /// Passed tests, including the kernel-log check.
    pub passed: usize,
    /// Failed or crashed tests, including the kernel-log check.
    pub failed: usize,
    /// Skipped tests.
    pub skipped: usize,
    /// Every counted test.
    pub tests: Vec<TestResult>,
    /// Kernel reports found in the log the suite caused.
    pub findings: Vec<Finding>,
}

impl SuiteVerdict {
    /// Whether nothing in this suite failed.
    pub fn ok(&self) -> bool {
        self.failed == 0
    }

    /// Its failed or crashed tests.
    pub fn failures(&self) -> impl Iterator<Item = &TestResult> {
        self.tests.iter().filter(|t| matches!(t.outcome, Outcome::Fail | Outcome::Crash))
    }
}

/// The verdict on a whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The kernel release the guest reported.
    pub kernel: Option<String>,
    /// Whether the guest reached the end of its plan.
    pub done: bool,
    /// The suites, in the order they ran.
    pub suites: Vec<SuiteVerdict>,
    /// Totals over the gated suites.
    pub gated: Totals,
    /// Whether the run passes: every gated suite passed and the guest
    /// finished.
    pub ok: bool,
}

impl Summary {
    /// The failed or crashed tests of the gated suites, with their suites' names.
    pub fn gated_failures(&self) -> impl Iterator<Item = (&str, &TestResult)> {
        self.suites
            .iter()
            .filter(|s| s.gated)
            .flat_map(|s| s.failures().map(move |t| (s.name.as_str(), t)))
    }

    /// Recounts the gated totals and the verdict from the suites.
    fn total(&mut self) {
        let mut gated = Totals::default();
        for s in self.suites.iter().filter(|s| s.gated) {
            gated.passed += s.passed;
            gated.failed += s.failed;
            gated.skipped += s.skipped;
        }
        self.gated = gated;
        self.ok = self.done
            && gated.failed == 0
            && self.suites.iter().filter(|s| s.gated).all(SuiteVerdict::ok);
    }

    /// Adds a gated suite that ran on the host, such as `compile-fail`, from its KTAP, before
    /// the guest's suites (after the host suites added before it), and recounts the verdict.
    ///
    /// `ktap_text` is `None` when the suite wrote no KTAP, which fails it. A failed test's note
    /// is the diagnostic line `# <test>: <reason>` the suite printed for it.
    pub fn add_host_suite(&mut self, name: &str, ktap_text: Option<&str>) {
        let text = ktap_text.unwrap_or("");
        let mut tests = ktap::parse(text).tests;
        for t in tests
            .iter_mut()
            .filter(|t| t.outcome != Outcome::Pass && t.note.is_empty())
        {
            let prefix = format!("# {}: ", t.name);
            if let Some(reason) = text
                .lines()
                .find_map(|l| l.trim_start().strip_prefix(&prefix))
            {
                t.note = reason.trim().to_string();
            }
        }
        if tests.is_empty() {
            let note = match ktap_text {
                None => "the suite wrote no KTAP file".to_string(),
                Some(_) => "the suite's KTAP holds no result".to_string(),
            };
            tests.push(synthetic("ktap output", false, note));
        }
        let passed = tests.iter().filter(|t| t.outcome == Outcome::Pass).count();
        let skipped = tests.iter().filter(|t| t.outcome == Outcome::Skip).count();
        let failed = tests.len() - passed - skipped;
        let at = self.suites.iter().take_while(|s| s.host).count();
        self.suites.insert(
            at,
            SuiteVerdict {
                name: name.to_string(),
                gated: true,
                host: true,
                expect_findings: false,
                rc: None,
                passed,
                failed,
                skipped,
                tests,
                findings: Vec::new(),
            },
        );
        self.total();
    }
}

/// Counts over several suites.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Totals {
    /// Passed tests.
    pub passed: usize,
    /// Failed tests.
    pub failed: usize,
    /// Skipped tests.
    pub skipped: usize,
}

/// Names of the checks the judge adds to a suite's own tests.
pub const SYNTHETIC: &[&str] = &[
    "finished",
    "exit status",
    "ktap output",
    "kernel log clean",
    "kernel log report caught",
];

fn synthetic(name: &str, pass: bool, note: String) -> TestResult {
    TestResult {
        name: name.to_string(),
        outcome: if pass { Outcome::Pass } else { Outcome::Fail },
        note,
    }
}

/// Judges a parsed stream. `console` is the kernel console, scanned for the
/// reports of a suite that never finished (its dmesg was never dumped).
pub fn judge(stream: &Stream, console: &str) -> Summary {
    let mut suites = Vec::new();
    for s in &stream.suites {
        let is_boot = s.name == "boot";
        let report = ktap::parse(&s.output);
        let mut tests = report.tests.clone();
        match s.rc {
            None => tests.push(synthetic(
                "finished",
                false,
                "the suite never finished: the guest crashed, hung or hit the run's timeout".into(),
            )),
            Some(RC_KILLED) => tests.push(synthetic("finished", false, "killed by the suite timeout".into())),
            Some(0) => {}
            Some(rc) if report.failed() == 0 => {
                tests.push(synthetic("exit status", false, format!("exited {rc} without a failed test")))
            }
            Some(_) => {}
        }
        if !is_boot && !report.saw_ktap && s.rc.is_some() {
            tests.push(synthetic("ktap output", false, "the suite printed no KTAP".into()));
        }
        // A suite that never finished has no dmesg of its own; the console
        // holds what the kernel said.
        let findings = if s.rc.is_none() {
            dmesg::scan(&format!("{}{}", s.dmesg, console))
        } else {
            dmesg::scan(&s.dmesg)
        };
        if s.expect_findings {
            tests.push(synthetic(
                "kernel log report caught",
                !findings.is_empty(),
                if findings.is_empty() {
                    "the expected kernel report was not found".into()
                } else {
                    format!("{} report(s), as expected", findings.len())
                },
            ));
        } else {
            tests.push(synthetic(
                "kernel log clean",
                findings.is_empty(),
                if findings.is_empty() {
                    String::new()
                } else {
                    format!("{} kernel report(s)", findings.len())
                },
            ));
        }
        let passed = tests.iter().filter(|t| t.outcome == Outcome::Pass).count();
        let skipped = tests.iter().filter(|t| t.outcome == Outcome::Skip).count();
        let failed = tests.len() - passed - skipped;
        suites.push(SuiteVerdict {
            name: s.name.clone(),
            gated: s.gated,
            host: false,
            expect_findings: s.expect_findings,
            rc: s.rc,
            passed,
            failed,
            skipped,
            tests,
            findings,
        });
    }
    if !stream.done {
        let findings = dmesg::scan(console);
        let tests = vec![synthetic(
            "guest finished its plan",
            false,
            "no end-of-plan marker: the guest crashed, hung or timed out".into(),
        )];
        suites.push(SuiteVerdict {
            name: "bench".into(),
            gated: true,
            host: false,
            expect_findings: false,
            rc: None,
            passed: 0,
            failed: 1,
            skipped: 0,
            tests,
            findings,
        });
    }
    let mut summary = Summary {
        kernel: stream.kernel.clone(),
        done: stream.done,
        suites,
        gated: Totals::default(),
        ok: false,
    };
    summary.total();
    summary
}


/// The verdict of a run that booted and ran `suite` alone, not gated, with KTAP `results`
/// (for the tests of the modules that compare runs).
#[cfg(test)]
pub(crate) fn one_suite_run(suite: &str, results: &str) -> Summary {
    judge(
        &crate::stream::parse(&format!(
            "@@DMIRROR BOOT 7.3.4\n@@DMIRROR DMESG boot\n@@DMIRROR END boot rc=0\n\
             @@DMIRROR BEGIN {suite} gated=0 expect_findings=0\n{results}@@DMIRROR DMESG {suite}\n\
             @@DMIRROR END {suite} rc=0\n@@DMIRROR DONE\n"
        )),
        "",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream;

    fn run(text: &str) -> Summary {
        judge(&stream::parse(text), "")
    }

    const BOOT: &str = "@@DMIRROR BOOT 7.3.4\n@@DMIRROR DMESG boot\n[0] ok\n@@DMIRROR END boot rc=0\n";

    #[test]
    fn green_run() {
        let s = run(&format!(
            "{BOOT}@@DMIRROR BEGIN a gated=1 expect_findings=0\n1..2\nok 1 x\nok 2 y # SKIP z\n@@DMIRROR DMESG a\n@@DMIRROR END a rc=0\n@@DMIRROR DONE\n"
        ));
        assert!(s.ok);
        assert_eq!(s.gated, Totals { passed: 3, failed: 0, skipped: 1 });
    }

    #[test]
    fn warning_fails_a_gated_suite() {
        let s = run(&format!(
            "{BOOT}@@DMIRROR BEGIN a gated=1 expect_findings=0\n1..1\nok 1 x\n@@DMIRROR DMESG a\nWARNING: CPU: 0 PID: 1 at x\n@@DMIRROR END a rc=0\n@@DMIRROR DONE\n"
        ));
        assert!(!s.ok);
        assert_eq!(s.suites[1].findings.len(), 1);
    }

    #[test]
    fn ungated_failure_does_not_fail_the_run() {
        let s = run(&format!(
            "{BOOT}@@DMIRROR BEGIN ref gated=0 expect_findings=0\n1..1\nnot ok 1 x\n@@DMIRROR DMESG ref\nOops: 0000\n@@DMIRROR END ref rc=1\n@@DMIRROR DONE\n"
        ));
        assert!(s.ok);
        assert_eq!(s.suites[1].failed, 2);
    }

    #[test]
    fn expected_findings_must_appear() {
        let with = run(&format!(
            "{BOOT}@@DMIRROR BEGIN c gated=1 expect_findings=1\n1..1\nok 1 x\n@@DMIRROR DMESG c\nWARNING: CPU: 0\n@@DMIRROR END c rc=0\n@@DMIRROR DONE\n"
        ));
        assert!(with.ok);
        let without = run(&format!(
            "{BOOT}@@DMIRROR BEGIN c gated=1 expect_findings=1\n1..1\nok 1 x\n@@DMIRROR DMESG c\n@@DMIRROR END c rc=0\n@@DMIRROR DONE\n"
        ));
        assert!(!without.ok);
    }

    #[test]
    fn crash_and_timeout_fail() {
        let crashed = judge(
            &stream::parse(&format!("{BOOT}@@DMIRROR BEGIN a gated=1 expect_findings=0\n1..3\nok 1 x\n")),
            "BUG: kernel NULL pointer dereference\n",
        );
        assert!(!crashed.ok);
        assert_eq!(crashed.suites[1].findings.len(), 1);
        assert!(crashed.suites.iter().any(|s| s.name == "bench"));
        let killed = run(&format!(
            "{BOOT}@@DMIRROR BEGIN a gated=1 expect_findings=0\n1..1\nok 1 x\n@@DMIRROR DMESG a\n@@DMIRROR END a rc=137\n@@DMIRROR DONE\n"
        ));
        assert!(!killed.ok);
    }

    #[test]
    fn nonzero_exit_without_failed_test_fails() {
        let s = run(&format!(
            "{BOOT}@@DMIRROR BEGIN a gated=1 expect_findings=0\n1..1\nok 1 x\n@@DMIRROR DMESG a\n@@DMIRROR END a rc=1\n@@DMIRROR DONE\n"
        ));
        assert!(!s.ok);
    }

    /// The gated totals of a run: passed, failed, skipped.
    fn totals(s: &Summary) -> (usize, usize, usize) {
        (s.gated.passed, s.gated.failed, s.gated.skipped)
    }

    /// The KTAP `dmirror-bench compile-fail` writes, one case passing and one failing.
    const HOST_KTAP: &str = "KTAP version 1\n# compile-fail: each misuse must fail with its error code, each control must build\n1..2\nok 1 sample_arc_moved\n# sample_kvec_type: failed with E0308, expected E0599\nnot ok 2 sample_kvec_type\n";

    const GREEN: &str = "@@DMIRROR BOOT 7.3.4\n@@DMIRROR DMESG boot\n[0] ok\n@@DMIRROR END boot rc=0\n@@DMIRROR BEGIN a gated=1 expect_findings=0\n1..1\nok 1 x\n@@DMIRROR DMESG a\n@@DMIRROR END a rc=0\n@@DMIRROR DONE\n";

    #[test]
    fn host_suite_is_merged_gated_and_first() {
        let mut s = run(GREEN);
        assert!(s.ok);
        assert_eq!(totals(&s), (3, 0, 0));
        s.add_host_suite("compile-fail", Some(HOST_KTAP));
        let cf = &s.suites[0];
        assert_eq!(
            (cf.name.as_str(), cf.gated, cf.host),
            ("compile-fail", true, true)
        );
        assert_eq!((cf.passed, cf.failed, cf.skipped), (1, 1, 0));
        assert_eq!(cf.tests[1].note, "failed with E0308, expected E0599");
        assert_eq!(totals(&s), (4, 1, 0));
        assert!(!s.ok);
        let failures: Vec<_> = s
            .gated_failures()
            .map(|(suite, t)| (suite, t.name.as_str()))
            .collect();
        assert_eq!(failures, [("compile-fail", "sample_kvec_type")]);
        // A second host suite goes after the first, still before the guest's.
        s.add_host_suite("other", Some("1..1\nok 1 y\n"));
        let names: Vec<_> = s.suites.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["compile-fail", "other", "boot", "a"]);
        assert_eq!(totals(&s), (5, 1, 0));
    }

    #[test]
    fn green_host_suite_keeps_the_run_green() {
        let mut s = run(GREEN);
        s.add_host_suite("compile-fail", Some("1..2\nok 1 a\nok 2 b\n"));
        assert!(s.ok);
        assert_eq!(totals(&s), (5, 0, 0));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["suites"][0]["name"], "compile-fail");
        assert_eq!(json["suites"][0]["host"], true);
        assert_eq!(json["suites"][0]["gated"], true);
        assert_eq!(json["gated"]["passed"], 5);
    }

    #[test]
    fn missing_or_cut_host_ktap_fails() {
        let mut s = run(GREEN);
        s.add_host_suite("compile-fail", None);
        assert!(!s.ok);
        assert_eq!(s.suites[0].tests[0].name, "ktap output");
        assert_eq!(s.suites[0].tests[0].note, "the suite wrote no KTAP file");
        let mut s = run(GREEN);
        s.add_host_suite("compile-fail", Some("KTAP version 1\n1..2\nok 1 a\n"));
        assert!(!s.ok);
        assert_eq!((s.suites[0].passed, s.suites[0].failed), (1, 1));
        let mut s = run(GREEN);
        s.add_host_suite("compile-fail", Some(""));
        assert!(!s.ok);
    }

    #[test]
    fn host_suite_does_not_hide_an_unfinished_guest() {
        let mut s = run(&GREEN.replace("@@DMIRROR DONE\n", ""));
        s.add_host_suite("compile-fail", Some("1..1\nok 1 a\n"));
        assert!(!s.ok);
    }

}
