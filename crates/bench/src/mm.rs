//! The kernel's mm selftests on the stock kernel beside the patched one: one row per test case,
//! a verdict per row, and what `make test` fails on. A case that passes on stock and does not
//! pass patched is a regression; a case that fails on both (or on the patched kernel where stock
//! skipped it or never reported it) must have a recorded reason, an environment limit or a stock
//! bug, in the known-failures file (`qemu/mm-selftests.known`); a kernel report in the patched
//! run's suite fails too.

use crate::dmesg::Finding;
use crate::ktap::Outcome;
use crate::regress::cell;
use crate::verdict::{Summary, SYNTHETIC};
use serde::Serialize;

/// The suite both runs hold.
pub const SUITE: &str = dmirror_abi::MM_SUITE;

/// What the pair of results says about one case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Passes on both kernels.
    PassBoth,
    /// Fails (or crashes) on stock, passes patched.
    Fixed,
    /// Passes patched; stock never reported it (its run ended early).
    PassPatchedOnly,
    /// Skipped on either kernel, and not failing on the patched one.
    Skip,
    /// Does not pass on the patched kernel and did not pass on stock either.
    FailBoth,
    /// Passes on stock, and fails, crashes, is skipped or is missing on the patched kernel.
    Regression,
}

/// One test case on both kernels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    /// The case: the program's label, a dot, the case's own name.
    pub name: String,
    pub stock: Option<Outcome>,
    pub patched: Option<Outcome>,
    pub verdict: Verdict,
    /// For a skip: the skip's reason; for a failure on both: the recorded reason (`None` when
    /// nobody recorded one, which fails the comparison).
    pub reason: Option<String>,
}

/// A recorded reason for cases that fail on both kernels: every case whose name starts with
/// `prefix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Known {
    pub prefix: String,
    pub reason: String,
}

/// Parses a rules file (the known failures, or the cases that show a fix): one
/// `PREFIX<TAB>REASON` a line; blank lines and lines starting with `#` are ignored.
pub fn parse_known(text: &str) -> Result<Vec<Known>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_end();
        if t.trim().is_empty() || t.trim_start().starts_with('#') {
            continue;
        }
        let (prefix, reason) = t
            .split_once('\t')
            .map(|(p, r)| (p.trim(), r.trim()))
            .filter(|(p, r)| !p.is_empty() && !r.is_empty())
            .ok_or(format!("line {}: want PREFIX<TAB>REASON: {t}", i + 1))?;
        out.push(Known { prefix: prefix.into(), reason: reason.into() });
    }
    Ok(out)
}

/// The cases of the suite in a run, with their outcome and note; a name that repeats gets
/// ` [2]`, ` [3]`... in the order it came, so both runs pair up the same way.
fn cases(s: &Summary) -> Vec<(String, Outcome, String)> {
    let mut out: Vec<(String, Outcome, String)> = Vec::new();
    for t in s
        .suites
        .iter()
        .filter(|v| v.name == SUITE)
        .flat_map(|v| v.tests.iter())
        .filter(|t| !SYNTHETIC.contains(&t.name.as_str()))
    {
        let seen = out.iter().filter(|(n, _, _)| n == &t.name || n.starts_with(&format!("{} [", t.name))).count();
        let name = if seen == 0 { t.name.clone() } else { format!("{} [{}]", t.name, seen + 1) };
        out.push((name, t.outcome, t.note.clone()));
    }
    out
}

fn passes(o: Option<Outcome>) -> bool {
    o == Some(Outcome::Pass)
}

fn fails(o: Option<Outcome>) -> bool {
    matches!(o, Some(Outcome::Fail | Outcome::Crash))
}

/// The case the output of a run started last (the kselftest harness's `#  RUN  NAME ...`), if any.
fn last_started(output: &str) -> Option<&str> {
    output
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix('#')?.trim_start().strip_prefix("RUN "))
        .map(|r| r.trim().trim_end_matches("...").trim_end())
        .next_back()
}

/// The stock outcome of one of the series' selftests that take the stock kernel down (`rule`: its
/// name and the fix it shows), from the boot of its own that ran it with `oops=panic` (`crash`,
/// the suite's output in `output`): its own result when the boot reported one, a crash when the
/// boot ended in a kernel report while it was the last case started. What is neither is an
/// error: the boot shows nothing about the case.
pub fn crash_case(rule: &Known, crash: &Summary, output: &str) -> Result<(String, Outcome, String), String> {
    if let Some(c) = cases(crash).into_iter().find(|(n, _, _)| *n == rule.prefix) {
        return Ok(c);
    }
    match (crash.done, findings(crash).first(), last_started(output)) {
        (false, Some(f), Some(name)) if rule.prefix.ends_with(&format!(".{name}")) => {
            Ok((rule.prefix.clone(), Outcome::Crash, format!("the kernel crashed running it: {}", f.line)))
        }
        (false, Some(_), Some(name)) => {
            Err(format!("{}: its crash boot crashed in another case, {name} ({})", rule.prefix, rule.reason))
        }
        _ => Err(format!(
            "{}: its crash boot neither reported it nor ended in a kernel report while it ran ({})",
            rule.prefix, rule.reason
        )),
    }
}

/// Pairs the cases of the two runs, patched run's order first; `crashed` (from [`crash_case`])
/// replaces the stock run's cases of the same name.
pub fn compare(patched: &Summary, stock: &Summary, crashed: &[(String, Outcome, String)], known: &[Known]) -> Vec<Row> {
    let p = cases(patched);
    let mut s = cases(stock);
    for c in crashed {
        match s.iter_mut().find(|(n, _, _)| *n == c.0) {
            Some(old) => *old = c.clone(),
            None => s.push(c.clone()),
        }
    }
    let find = |v: &[(String, Outcome, String)], name: &str| {
        v.iter().find(|(n, _, _)| n == name).map(|(_, o, note)| (*o, note.clone()))
    };
    let mut rows: Vec<Row> = Vec::new();
    for (name, _, _) in p.iter().chain(s.iter()) {
        if rows.iter().any(|r| r.name == *name) {
            continue;
        }
        let (sp, pp) = (find(&s, name), find(&p, name));
        let (stock, patched) = (sp.as_ref().map(|x| x.0), pp.as_ref().map(|x| x.0));
        let skip_note = || {
            [(&pp, "patched"), (&sp, "stock")]
                .iter()
                .find_map(|(x, k)| match x {
                    Some((Outcome::Skip, note)) => Some(format!("{k}: {}", if note.is_empty() { "no reason given" } else { note })),
                    _ => None,
                })
        };
        let verdict = if passes(stock) && !passes(patched) {
            Verdict::Regression
        } else if passes(patched) && passes(stock) {
            Verdict::PassBoth
        } else if passes(patched) && fails(stock) {
            Verdict::Fixed
        } else if passes(patched) && stock.is_none() {
            Verdict::PassPatchedOnly
        } else if fails(patched) || (patched.is_none() && fails(stock)) {
            Verdict::FailBoth
        } else {
            Verdict::Skip
        };
        let reason = match verdict {
            Verdict::Skip => skip_note(),
            Verdict::FailBoth => known.iter().find(|k| name.starts_with(&k.prefix)).map(|k| k.reason.clone()),
            _ => None,
        };
        rows.push(Row { name: name.clone(), stock, patched, verdict, reason });
    }
    rows
}

fn verdict_text(r: &Row) -> String {
    match r.verdict {
        Verdict::PassBoth => "pass both".into(),
        Verdict::Fixed => "fixed: fails on stock, passes patched".into(),
        Verdict::PassPatchedOnly => "passes patched (stock never reported it)".into(),
        Verdict::Skip => format!("skip: {}", r.reason.as_deref().unwrap_or("")),
        Verdict::FailBoth => match &r.reason {
            Some(why) => format!("fails on both: {why}"),
            None => "FAIL: fails on both and no reason is recorded".into(),
        },
        Verdict::Regression => "REGRESSION: passes on stock, not patched".into(),
    }
}

/// Counts by verdict, and whether the comparison passes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub cases: usize,
    pub pass_both: usize,
    pub fixed: usize,
    pub pass_patched_only: usize,
    pub skipped: usize,
    pub fail_both: usize,
    /// Cases failing on both without a recorded reason.
    pub unexplained: usize,
    pub regressions: usize,
}

/// Counts the rows.
pub fn counts(rows: &[Row]) -> Counts {
    let n = |v: Verdict| rows.iter().filter(|r| r.verdict == v).count();
    Counts {
        cases: rows.len(),
        pass_both: n(Verdict::PassBoth),
        fixed: n(Verdict::Fixed),
        pass_patched_only: n(Verdict::PassPatchedOnly),
        skipped: n(Verdict::Skip),
        fail_both: n(Verdict::FailBoth),
        unexplained: rows.iter().filter(|r| r.verdict == Verdict::FailBoth && r.reason.is_none()).count(),
        regressions: n(Verdict::Regression),
    }
}

/// The one-line summary `make test` prints.
pub fn summary_line(c: &Counts) -> String {
    let mut s = format!(
        "mm-selftests: {} cases, {} pass both, {} fail both (listed{}), {} skipped",
        c.cases,
        c.pass_both,
        c.fail_both,
        if c.unexplained > 0 { format!(", {} without a reason", c.unexplained) } else { String::new() },
        c.skipped
    );
    if c.fixed > 0 {
        s.push_str(&format!(", {} fixed", c.fixed));
    }
    if c.pass_patched_only > 0 {
        s.push_str(&format!(", {} pass patched only", c.pass_patched_only));
    }
    s.push_str(&format!(", {} regressions", c.regressions));
    s
}

/// The whole comparison's verdict: no regression, every failure on both explained, every case
/// the series adds to show a fix fails on stock and passes patched (`unproven` is empty), no
/// kernel report in the patched run's suite, both runs finished and the patched one has cases.
pub fn ok(c: &Counts, unproven: &[String], patched_findings: &[Finding], both_done: bool) -> bool {
    c.regressions == 0
        && c.unexplained == 0
        && unproven.is_empty()
        && patched_findings.is_empty()
        && both_done
        && c.cases > 0
}

/// The series' own selftests, each of which must show its fix (`fixed` rules: a case-name prefix
/// and the fix it shows): what does not, a rule that matches no case, or a matching case that is
/// not "fixed" (failing on stock, passing patched).
pub fn unproven(rows: &[Row], fixed: &[Known]) -> Vec<String> {
    let mut out = Vec::new();
    for rule in fixed {
        let matching: Vec<&Row> = rows.iter().filter(|r| r.name.starts_with(&rule.prefix)).collect();
        if matching.is_empty() {
            out.push(format!("{}: no such case in either run ({})", rule.prefix, rule.reason));
        }
        for r in matching.into_iter().filter(|r| r.verdict != Verdict::Fixed) {
            out.push(format!(
                "{} (stock {}, patched {}): does not show its fix, {}",
                r.name,
                cell(r.stock),
                cell(r.patched),
                rule.reason
            ));
        }
    }
    out
}

/// The table as markdown: one row per case, then the failures on both with their reasons.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from("| test case | stock | patched | verdict |\n|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.name.replace('|', "\\|"),
            cell(r.stock),
            cell(r.patched),
            verdict_text(r).replace('|', "\\|")
        ));
    }
    out
}

/// The rows that need a reader's eye: failures on both, fixes, regressions, in that order (the
/// regressions last, next to the summary line, where the tail of a CI log shows them).
pub fn notable(rows: &[Row]) -> Vec<String> {
    let order = [Verdict::FailBoth, Verdict::Fixed, Verdict::Regression];
    order
        .iter()
        .flat_map(|v| rows.iter().filter(move |r| r.verdict == *v))
        .map(|r| format!("{} (stock {}, patched {}): {}", r.name, cell(r.stock), cell(r.patched), verdict_text(r)))
        .collect()
}

/// The suite's kernel reports in a run.
pub fn findings(s: &Summary) -> Vec<Finding> {
    s.suites.iter().filter(|v| v.name == SUITE).flat_map(|v| v.findings.iter().cloned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::judge;

    fn run(results: &str) -> Summary {
        crate::verdict::one_suite_run(SUITE, results)
    }

    fn verdicts(rows: &[Row]) -> Vec<(&str, Verdict)> {
        rows.iter().map(|r| (r.name.as_str(), r.verdict)).collect()
    }

    #[test]
    fn every_verdict() {
        let stock = run("KTAP version 1\n1..1\n    1..7\n    ok 1 a\n    ok 2 b\n    not ok 3 c\n    not ok 4 d\n    ok 5 e # SKIP no uffd\n    ok 6 f\n    not ok 7 g\nnot ok 1 p\n");
        let patched = run("KTAP version 1\n1..1\n    1..7\n    ok 1 a\n    not ok 2 b\n    ok 3 c\n    not ok 4 d\n    ok 5 e # SKIP no uffd\n    ok 6 f # SKIP gone\n    ok 7 h\nnot ok 1 p\n");
        let known = parse_known("# comment\np.d\ta stock bug\n").unwrap();
        let rows = compare(&patched, &stock, &[], &known);
        assert_eq!(
            verdicts(&rows),
            [
                ("p.a", Verdict::PassBoth),
                ("p.b", Verdict::Regression),
                ("p.c", Verdict::Fixed),
                ("p.d", Verdict::FailBoth),
                ("p.e", Verdict::Skip),
                ("p.f", Verdict::Regression),
                ("p.h", Verdict::PassPatchedOnly),
                ("p.g", Verdict::FailBoth),
            ]
        );
        assert_eq!(rows[3].reason.as_deref(), Some("a stock bug"));
        assert_eq!(rows[4].reason.as_deref(), Some("patched: no uffd"));
        // `g` fails on stock and is missing patched: nobody recorded why.
        assert_eq!(rows[7].reason, None);
        let c = counts(&rows);
        assert_eq!((c.cases, c.pass_both, c.regressions, c.fail_both, c.unexplained), (8, 1, 2, 2, 1));
        assert!(!ok(&c, &[], &[], true));
        let t = table(&rows);
        assert!(t.contains("| p.b | pass | FAIL | REGRESSION"), "{t}");
        assert!(t.contains("| p.d | FAIL | FAIL | fails on both: a stock bug |"), "{t}");
        let n = notable(&rows);
        assert!(n[0].starts_with("p.d "), "{n:?}");
        assert!(n[n.len() - 2].starts_with("p.b "), "{n:?}");
        assert!(n[n.len() - 1].starts_with("p.f "), "{n:?}");
    }

    #[test]
    fn green_when_only_explained_failures() {
        let text = "1..3\nok 1 a\nnot ok 2 b\nok 3 c # SKIP no NUMA\n";
        let known = parse_known("b\tenvironment: no io_uring\n").unwrap();
        let rows = compare(&run(text), &run(text), &[], &known);
        let c = counts(&rows);
        assert_eq!((c.pass_both, c.fail_both, c.skipped, c.unexplained, c.regressions), (1, 1, 1, 0, 0));
        assert!(ok(&c, &[], &[], true));
        assert!(!ok(&c, &[], &[], false), "an unfinished run cannot be green");
        assert_eq!(
            summary_line(&c),
            "mm-selftests: 3 cases, 1 pass both, 1 fail both (listed), 1 skipped, 0 regressions"
        );
    }

    #[test]
    fn a_fix_is_shown_only_by_a_case_failing_on_stock() {
        let stock = run("1..1\n    1..3\n    not ok 1 fix one\n    ok 2 fix two\n    ok 3 other\nnot ok 1 p\n");
        let patched = run("1..1\n    1..3\n    ok 1 fix one\n    ok 2 fix two\n    ok 3 other\nok 1 p\n");
        let rows = compare(&patched, &stock, &[], &[]);
        let fixed = parse_known("p.fix one\tpatch 1\np.fix two\tpatch 2\np.gone\tpatch 3\n").unwrap();
        let u = unproven(&rows, &fixed);
        assert_eq!(u.len(), 2, "{u:?}");
        assert!(u[0].starts_with("p.fix two (stock pass, patched pass): does not show its fix"), "{u:?}");
        assert!(u[1].starts_with("p.gone: no such case"), "{u:?}");
        assert!(!ok(&counts(&rows), &u, &[], true));
        assert!(unproven(&rows, &fixed[..1]).is_empty());
    }

    #[test]
    fn crash_of_the_patched_program_is_a_regression() {
        // The patched program died after its first case: the rest never came.
        let stock = run("1..1\n    1..2\n    ok 1 a\n    ok 2 b\nok 1 p\n");
        let patched = run("1..1\n    1..2\n    ok 1 a\n");
        let rows = compare(&patched, &stock, &[], &[]);
        assert!(rows.iter().any(|r| r.name == "p.b" && r.verdict == Verdict::Regression), "{rows:?}");
    }

    #[test]
    fn a_crash_boot_fails_the_case_it_crashed_in() {
        // The crash boot's stream: the case started, then the kernel panicked (no result, no end).
        let output = "KTAP version 1\n1..1\n    1..1\n    #  RUN           f.v.x ...\n";
        let crash = judge(
            &crate::stream::parse(&format!(
                "@@DMIRROR BOOT 7.3.4\n@@DMIRROR DMESG boot\n@@DMIRROR END boot rc=0\n\
                 @@DMIRROR BEGIN {SUITE} gated=0 expect_findings=0\n{output}"
            )),
            "[  9.0] kernel BUG at mm/migrate.c:369!\n",
        );
        let rules = parse_known("p.f.v.x\tpatch 8\np.f.v.y\tpatch 9\n").unwrap();
        let crashed = vec![crash_case(&rules[0], &crash, output).unwrap()];
        assert_eq!((crashed[0].0.as_str(), crashed[0].1), ("p.f.v.x", Outcome::Crash));
        assert!(crashed[0].2.contains("kernel BUG at mm/migrate.c:369"), "{crashed:?}");
        let e = crash_case(&rules[1], &crash, output).unwrap_err();
        assert!(e.starts_with("p.f.v.y: its crash boot crashed in another case, f.v.x"), "{e}");
        // The stock run's placeholder for the case gives way to the crash.
        let stock = run("1..1\nok 1 p.f.v.x # SKIP in the crash boot\n");
        let patched = run("1..1\n    1..1\n    ok 1 f.v.x\nok 1 p\n");
        let rows = compare(&patched, &stock, &crashed, &[]);
        assert_eq!(verdicts(&rows), [("p.f.v.x", Verdict::Fixed)]);
        assert!(unproven(&rows, &rules[..1]).is_empty());
        // A boot that finished without reporting the case shows nothing.
        assert!(crash_case(&rules[0], &run("1..0\n"), "").is_err());
    }

    #[test]
    fn repeated_names_pair_in_order() {
        let stock = run("1..3\nok 1 x\nnot ok 2 x\nok 3 x\n");
        let patched = run("1..3\nok 1 x\nok 2 x\nok 3 x\n");
        let rows = compare(&patched, &stock, &[], &[]);
        assert_eq!(verdicts(&rows), [("x", Verdict::PassBoth), ("x [2]", Verdict::Fixed), ("x [3]", Verdict::PassBoth)]);
    }

    #[test]
    fn empty_run_is_not_green() {
        let rows = compare(&run("1..0\n"), &run("1..0\n"), &[], &[]);
        assert!(!ok(&counts(&rows), &[], &[], true));
    }

    #[test]
    fn known_file_errors() {
        assert!(parse_known("no tab here\n").is_err());
        assert!(parse_known("x\t\n").is_err());
        assert_eq!(parse_known("\n# c\n").unwrap(), []);
    }
}
