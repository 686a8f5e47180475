//! A lenient KTAP/TAP parser.
//!
//! It accepts kselftest's "TAP version 13", KUnit's "KTAP version 1", indented
//! subtests and diagnostic noise between result lines. Leaf results are
//! counted; a parent that failed although all of its children passed counts
//! as one more failure; every test the plan announced whose result line never
//! came counts as crashed (a failure).

use serde::Serialize;

/// The outcome of one test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// `ok`, also `ok ... # XFAIL` (an expected failure).
    Pass,
    /// `not ok` without a directive.
    Fail,
    /// `ok`/`not ok` with `# SKIP` or `# TODO`.
    Skip,
    /// Announced by a plan, but no result line came.
    Crash,
}

/// One counted test.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TestResult {
    /// Name, prefixed with its parents' names.
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
    /// The directive text (skip reason) or the crash explanation.
    pub note: String,
}

/// Everything the parser found in one suite's output.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The counted tests, in output order.
    pub tests: Vec<TestResult>,
    /// Whether any version line, plan or result line was seen.
    pub saw_ktap: bool,
}

impl Report {
    /// Number of tests with `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.tests.iter().filter(|t| t.outcome == outcome).count()
    }

    /// Passed tests.
    pub fn passed(&self) -> usize {
        self.count(Outcome::Pass)
    }

    /// Failed and crashed tests.
    pub fn failed(&self) -> usize {
        self.count(Outcome::Fail) + self.count(Outcome::Crash)
    }

    /// Skipped tests.
    pub fn skipped(&self) -> usize {
        self.count(Outcome::Skip)
    }
}

/// A parsed result line.
#[derive(Debug, PartialEq, Eq)]
struct Line {
    indent: usize,
    ok: bool,
    number: u64,
    name: String,
    directive: Option<(String, String)>,
}

fn parse_result(line: &str) -> Option<Line> {
    let trimmed = line.trim_start();
    let indent = line.len() - trimmed.len();
    let (ok, rest) = if let Some(r) = trimmed.strip_prefix("not ok ") {
        (false, r)
    } else if let Some(r) = trimmed.strip_prefix("ok ") {
        (true, r)
    } else {
        return None;
    };
    let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let number = rest[..digits].parse().ok()?;
    let mut rest = rest[digits..].trim_start();
    rest = rest.strip_prefix("- ").unwrap_or(rest);
    let (name, directive) = match rest.find(" # ").or_else(|| rest.find("# ").filter(|&i| i == 0)) {
        Some(i) => {
            let d = rest[i..].trim_start().trim_start_matches('#').trim();
            let word: String = d.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
            let reason = d.split_once(char::is_whitespace).map(|x| x.1.trim()).unwrap_or("");
            (rest[..i].trim().to_string(), Some((word, reason.to_string())))
        }
        None => (rest.trim().to_string(), None),
    };
    Some(Line {
        indent,
        ok,
        number,
        name,
        directive,
    })
}

fn parse_plan(line: &str) -> Option<(usize, u64)> {
    let trimmed = line.trim_start();
    let indent = line.len() - trimmed.len();
    let rest = trimmed.strip_prefix("1..")?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() {
        return None;
    }
    Some((indent, digits.parse().ok()?))
}

/// A level of nesting: its plan, the results seen and their children.
#[derive(Default)]
struct Level {
    indent: usize,
    plan: Option<u64>,
    seen: u64,
    /// Results counted below this level since its last own result line.
    pending: Vec<TestResult>,
}

fn outcome_of(line: &Line) -> (Outcome, String) {
    match &line.directive {
        Some((word, reason)) if word == "SKIP" || word == "TODO" => (Outcome::Skip, reason.clone()),
        Some((word, reason)) if word == "XFAIL" => (Outcome::Pass, format!("xfail: {reason}")),
        _ if line.ok => (Outcome::Pass, String::new()),
        _ => (Outcome::Fail, String::new()),
    }
}

fn crashed(level: &Level, out: &mut Vec<TestResult>, prefix: &str) {
    if let Some(plan) = level.plan {
        for n in level.seen + 1..=plan {
            out.push(TestResult {
                name: format!("{prefix}#{n}"),
                outcome: Outcome::Crash,
                note: "no result line (crashed or timed out)".into(),
            });
        }
    }
}

/// Parses one suite's output.
pub fn parse(text: &str) -> Report {
    let mut report = Report::default();
    // levels[0] is the top level; deeper levels are pushed on indentation.
    let mut levels: Vec<Level> = vec![Level::default()];
    let mut top_indent: Option<usize> = None;

    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        let t = line.trim_start();
        if t.starts_with("TAP version") || t.starts_with("KTAP version") {
            report.saw_ktap = true;
            let indent = line.len() - t.len();
            if top_indent.is_none() {
                top_indent = Some(indent);
                levels[0].indent = indent;
            } else if indent > levels.last().map_or(0, |l| l.indent) {
                levels.push(Level {
                    indent,
                    ..Level::default()
                });
            }
            continue;
        }
        if let Some((indent, n)) = parse_plan(line) {
            report.saw_ktap = true;
            if top_indent.is_none() {
                top_indent = Some(indent);
                levels[0].indent = indent;
            }
            if indent > levels.last().map_or(0, |l| l.indent) {
                levels.push(Level {
                    indent,
                    ..Level::default()
                });
            }
            if let Some(level) = levels.iter_mut().rev().find(|l| l.indent == indent) {
                level.plan = Some(n);
            }
            continue;
        }
        let Some(result) = parse_result(line) else {
            continue;
        };
        report.saw_ktap = true;
        if top_indent.is_none() {
            top_indent = Some(result.indent);
            levels[0].indent = result.indent;
        }
        // A result deeper than the current level opens a new one (KTAP
        // subtests without their own version line).
        if result.indent > levels.last().map_or(0, |l| l.indent) {
            levels.push(Level {
                indent: result.indent,
                ..Level::default()
            });
        }
        // A result shallower than the current level closes the deeper levels:
        // their results become the children of this one.
        let mut children = Vec::new();
        while levels.len() > 1 && levels.last().is_some_and(|l| l.indent > result.indent) {
            let mut done = levels.pop().unwrap_or_default();
            let mut tests = std::mem::take(&mut done.pending);
            crashed(&done, &mut tests, &format!("{}.", result.name));
            children.append(&mut tests);
        }
        let (outcome, note) = outcome_of(&result);
        let Some(level) = levels.last_mut() else {
            continue;
        };
        level.seen = level.seen.max(result.number);
        if children.is_empty() {
            level.pending.push(TestResult {
                name: result.name,
                outcome,
                note,
            });
        } else {
            let all_pass = children.iter().all(|c| c.outcome != Outcome::Fail && c.outcome != Outcome::Crash);
            for mut child in children {
                child.name = format!("{}.{}", result.name, child.name);
                level.pending.push(child);
            }
            if outcome == Outcome::Fail && all_pass {
                level.pending.push(TestResult {
                    name: result.name,
                    outcome: Outcome::Fail,
                    note: "parent failed although its subtests passed".into(),
                });
            }
        }
    }

    // Close what is still open: results seen so far count, missing ones
    // crashed.
    while let Some(mut level) = levels.pop() {
        let mut tests = std::mem::take(&mut level.pending);
        crashed(&level, &mut tests, "");
        match levels.last_mut() {
            Some(parent) => {
                // An unfinished parent: its own result line never came.
                parent.pending.append(&mut tests);
                if parent.plan.is_some_and(|p| parent.seen < p) {
                    parent.seen += 1;
                    parent.pending.push(TestResult {
                        name: format!("#{}", parent.seen),
                        outcome: Outcome::Crash,
                        note: "subtest group never finished".into(),
                    });
                }
            }
            None => report.tests.append(&mut tests),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line_forms() {
        let l = parse_result("ok 3 - name here # SKIP no device").unwrap();
        assert!(l.ok);
        assert_eq!(l.number, 3);
        assert_eq!(l.name, "name here");
        assert_eq!(l.directive, Some(("SKIP".into(), "no device".into())));
        let l = parse_result("    not ok 12 hmm.hmm_device_private.x").unwrap();
        assert!(!l.ok);
        assert_eq!(l.indent, 4);
        assert_eq!(l.directive, None);
        assert!(parse_result("okay 1").is_none());
        assert!(parse_result("# ok 1 inside a comment").is_none());
        assert!(parse_result("ok x").is_none());
    }

    #[test]
    fn plain_pass_fail_skip() {
        let r = parse("TAP version 13\n1..3\nok 1 a\nnot ok 2 b\nok 3 c # SKIP why\n");
        assert_eq!((r.passed(), r.failed(), r.skipped()), (1, 1, 1));
        assert_eq!(r.tests[2].note, "why");
    }

    #[test]
    fn missing_results_are_crashes() {
        let r = parse("KTAP version 1\n1..4\nok 1 a\nok 2 b\n");
        assert_eq!(r.passed(), 2);
        assert_eq!(r.count(Outcome::Crash), 2);
        assert_eq!(r.failed(), 2);
    }

    #[test]
    fn kunit_nested_counts_leaves() {
        let text = "KTAP version 1\n1..2\n    KTAP version 1\n    # Subtest: s1\n    1..2\n    ok 1 t1\n    ok 2 t2\nok 1 s1\n    KTAP version 1\n    # Subtest: s2\n    1..1\n    not ok 1 t3\nnot ok 2 s2\n";
        let r = parse(text);
        assert_eq!((r.passed(), r.failed(), r.skipped()), (2, 1, 0));
        assert_eq!(r.tests[0].name, "s1.t1");
    }

    #[test]
    fn parent_failing_alone_counts() {
        let text = "KTAP version 1\n1..1\n    1..1\n    ok 1 t1\nnot ok 1 s1\n";
        let r = parse(text);
        assert_eq!((r.passed(), r.failed()), (1, 1));
    }

    #[test]
    fn nested_crash_mid_subtest() {
        let text = "KTAP version 1\n1..2\n    KTAP version 1\n    1..3\n    ok 1 t1\n";
        let r = parse(text);
        assert_eq!(r.passed(), 1);
        // Two subtests and the unfinished parent's sibling never reported.
        assert!(r.failed() >= 3, "{r:?}");
    }

    #[test]
    fn no_output_is_not_ktap() {
        let r = parse("Segmentation fault\n");
        assert!(!r.saw_ktap);
        assert!(r.tests.is_empty());
    }
}
