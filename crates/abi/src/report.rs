//! The words of a kernel report in the kernel log: the host's dmesg scanner and the guest
//! programs that read `/dev/kmsg` fail on the same lines.

/// Substrings that mark a kernel report, matched case-sensitively, with the name a finding is
/// filed under.
pub const PATTERNS: &[(&str, &str)] = &[
    ("BUG:", "BUG"),
    ("kernel BUG at", "BUG"),
    ("WARNING:", "WARNING"),
    ("Oops", "Oops"),
    ("general protection fault", "Oops"),
    ("Kernel panic", "panic"),
    ("KASAN", "KASAN"),
    ("refcount_t:", "refcount_t"),
    ("bad page", "bad page"),
    ("Bad page", "bad page"),
    // Lockdep's reports start with `WARNING:` or `BUG:`; these catch the rest of its output
    // without matching its boot banner ("RCU lockdep checking is enabled").
    ("lockdep is turned off", "lockdep"),
    ("DEBUG_LOCKS_WARN_ON", "lockdep"),
    ("suspicious RCU usage", "lockdep"),
    ("possible circular locking", "lockdep"),
    ("possible recursive locking", "lockdep"),
    ("inconsistent lock state", "lockdep"),
    ("hung task", "hung task"),
    ("blocked for more than", "hung task"),
    ("soft lockup", "soft lockup"),
    ("hard LOCKUP", "hard lockup"),
    ("unreferenced object", "kmemleak"),
    ("UBSAN:", "UBSAN"),
];

/// The kind of report a kernel log line is (`WARNING`, `lockdep`, ...), from the first of
/// [`PATTERNS`] it contains; `None` for a line that is no report.
pub fn kind(line: &str) -> Option<&'static str> {
    PATTERNS
        .iter()
        .find(|(p, _)| line.contains(p))
        .map(|(_, k)| *k)
}

/// Whether a kernel log line is a report.
pub fn is_report(line: &str) -> bool {
    kind(line).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(kind("[ 5.1] BUG: KASAN: use-after-free in foo"), Some("BUG"));
        assert_eq!(kind("[ 5.1] INFO: lockdep is turned off."), Some("lockdep"));
        assert_eq!(kind("[ 0.0] rcu: \tRCU lockdep checking is enabled."), None);
        assert!(is_report("unreferenced object 0xffff888 (size 64):"));
        assert!(!is_report("[ 1.2] dmirror: loaded"));
    }
}
