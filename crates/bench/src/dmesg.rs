//! The kernel-log scanner: any line that reports a kernel bug fails the run. What a report
//! looks like is [`dmirror_abi::report`]'s, which the guest's programs share.

use dmirror_abi::report;
use serde::Serialize;

/// Lines around a finding that are kept with it.
const BEFORE: usize = 3;
const AFTER: usize = 12;

/// One kernel report found in a log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The report's kind, e.g. `WARNING`.
    pub kind: String,
    /// The line number in the scanned text, from 1.
    pub line_no: usize,
    /// The line that matched.
    pub line: String,
    /// The lines around it.
    pub context: Vec<String>,
}

/// Scans `text` and returns one finding per report. Consecutive matching
/// lines within one report's context (e.g. `BUG:` followed by `Oops:`) are
/// reported once.
pub fn scan(text: &str) -> Vec<Finding> {
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    let mut findings: Vec<Finding> = Vec::new();
    let mut covered_until = 0usize;
    for (i, line) in lines.iter().enumerate() {
        let Some(kind) = report::kind(line) else {
            continue;
        };
        if i < covered_until {
            continue;
        }
        let lo = i.saturating_sub(BEFORE);
        let hi = (i + AFTER + 1).min(lines.len());
        findings.push(Finding {
            kind: kind.to_string(),
            line_no: i + 1,
            line: line.to_string(),
            context: lines[lo..hi].iter().map(|s| s.to_string()).collect(),
        });
        covered_until = hi;
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_log_has_no_findings() {
        let log = "[    0.000000] Linux version 7.3.4-dmirror\n[    1.2] dmirror: loaded\n[    1.3] Lock dependency validator: Copyright (c) 2006 Red Hat\n[    0.0] rcu: \tRCU lockdep checking is enabled.\n[    0.0] ... MAX_LOCKDEP_SUBCLASSES:  8\n[    0.1] kmemleak: Kernel memory leak detector initialized (mempool available:16)\n";
        assert!(scan(log).is_empty());
    }

    #[test]
    fn each_kind_is_found() {
        for (line, kind) in [
            ("[ 5.1] WARNING: CPU: 0 PID: 1 at mm/memremap.c:1 x+0x1/0x2", "WARNING"),
            ("[ 5.1] BUG: kernel NULL pointer dereference, address: 0", "BUG"),
            ("[ 5.1] Oops: general protection fault, probably for non-canonical address", "Oops"),
            ("[ 5.1] BUG: KASAN: use-after-free in foo", "BUG"),
            ("[ 5.1] refcount_t: underflow; use-after-free.", "refcount_t"),
            ("[ 5.1] BUG: Bad page state in process x", "BUG"),
            ("[ 5.1] page dumped because: bad page", "bad page"),
            ("[ 5.1] WARNING: possible circular locking dependency detected", "WARNING"),
            ("[ 5.1] INFO: task a:1 blocked for more than 60 seconds.", "hung task"),
            ("[ 5.1] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!", "BUG"),
            ("unreferenced object 0xffff888 (size 64):", "kmemleak"),
            ("[ 5.1] INFO: lockdep is turned off.", "lockdep"),
            ("[ 5.1] DEBUG_LOCKS_WARN_ON(1)", "lockdep"),
        ] {
            let f = scan(line);
            assert_eq!(f.len(), 1, "{line}");
            assert_eq!(f[0].kind, kind, "{line}");
        }
    }

    #[test]
    fn one_report_is_one_finding() {
        let log = "a\nBUG: kernel NULL pointer dereference\n#PF: supervisor read\nOops: 0000 [#1] SMP\nCall Trace:\n";
        let f = scan(log);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].line_no, 2);
        assert!(f[0].context.iter().any(|l| l.starts_with("Oops")));
    }

    #[test]
    fn separate_reports_are_separate() {
        let mut log = String::from("WARNING: first\n");
        for _ in 0..40 {
            log.push_str("filler\n");
        }
        log.push_str("WARNING: second\n");
        assert_eq!(scan(&log).len(), 2);
    }
}
