//! The regression table: the regression suite's results on the stock kernel (the series'
//! Rust patches only) beside the patched kernel. Each test must fail on stock, which shows
//! the bug, and pass on the patched kernel, which shows the fix.

use crate::ktap::Outcome;
use crate::verdict::{Summary, SYNTHETIC};

/// The suite both runs hold.
pub const SUITE: &str = "dmirror-regress";

/// One regression test on both kernels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    pub stock: Option<Outcome>,
    pub patched: Option<Outcome>,
    pub verdict: Verdict,
}

/// What the pair of results says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Fails on stock, passes patched.
    Fixed,
    /// Skipped on either kernel: the bug could not be shown here.
    Skip,
    /// Fails on the patched kernel, or passes on stock (the test does not detect the bug), or
    /// is missing from a run.
    Wrong,
}

fn outcomes(s: &Summary) -> Vec<(String, Outcome)> {
    s.suites
        .iter()
        .filter(|v| v.name == SUITE)
        .flat_map(|v| v.tests.iter())
        .filter(|t| !SYNTHETIC.contains(&t.name.as_str()))
        .map(|t| (t.name.clone(), t.outcome))
        .collect()
}

/// Pairs the regression suite's tests of the two runs.
pub fn compare(patched: &Summary, stock: &Summary) -> Vec<Row> {
    let p = outcomes(patched);
    let s = outcomes(stock);
    let mut rows: Vec<Row> = Vec::new();
    for (name, _) in p.iter().chain(s.iter()) {
        if rows.iter().any(|r| r.name == *name) {
            continue;
        }
        let find = |v: &[(String, Outcome)]| v.iter().find(|(n, _)| n == name).map(|(_, o)| *o);
        let (stock, patched) = (find(&s), find(&p));
        let verdict = match (stock, patched) {
            (Some(Outcome::Skip), _) | (_, Some(Outcome::Skip)) => Verdict::Skip,
            (Some(Outcome::Fail | Outcome::Crash), Some(Outcome::Pass)) => Verdict::Fixed,
            _ => Verdict::Wrong,
        };
        rows.push(Row { name: name.clone(), stock, patched, verdict });
    }
    rows
}

/// A run's outcome of a case, as a table cell.
pub(crate) fn cell(o: Option<Outcome>) -> &'static str {
    match o {
        Some(Outcome::Pass) => "pass",
        Some(Outcome::Fail) => "FAIL",
        Some(Outcome::Skip) => "skip",
        Some(Outcome::Crash) => "crash",
        None => "missing",
    }
}

/// The table as markdown.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from("| regression test | stock | patched | verdict |\n|---|---|---|---|\n");
    for r in rows {
        let verdict = match r.verdict {
            Verdict::Fixed => "fails without the fix, passes with it",
            Verdict::Skip => "SKIP: not shown here",
            Verdict::Wrong if r.patched != Some(Outcome::Pass) => "FAIL: fails on the patched kernel",
            Verdict::Wrong if r.stock == Some(Outcome::Pass) => "FAIL: passes on stock (does not detect the bug)",
            Verdict::Wrong => "FAIL: missing from a run",
        };
        out.push_str(&format!("| {} | {} | {} | {} |\n", r.name, cell(r.stock), cell(r.patched), verdict));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(results: &str) -> Summary {
        crate::verdict::one_suite_run(SUITE, results)
    }

    #[test]
    fn verdicts() {
        let stock = run("1..4\nnot ok 1 a\nok 2 b\nok 3 c # SKIP no\nnot ok 4 d\n");
        let patched = run("1..4\nok 1 a\nok 2 b\nok 3 c\nnot ok 4 d\n");
        let rows = compare(&patched, &stock);
        let v: Vec<_> = rows.iter().map(|r| (r.name.as_str(), r.verdict)).collect();
        assert_eq!(
            v,
            [("a", Verdict::Fixed), ("b", Verdict::Wrong), ("c", Verdict::Skip), ("d", Verdict::Wrong)]
        );
        assert!(table(&rows).contains("| b | pass | pass | FAIL: passes on stock"));
    }

    #[test]
    fn missing_from_stock_is_wrong() {
        let rows = compare(&run("1..1\nok 1 a\n"), &run("1..0\n"));
        assert_eq!(rows[0].verdict, Verdict::Wrong);
        assert_eq!(rows[0].stock, None);
    }
}
