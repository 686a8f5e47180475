//! Splits the guest's result stream (its second serial port) into suites.
//!
//! The guest's init script frames each suite between marker lines:
//! `@@DMIRROR BEGIN <suite> gated=<0|1> expect_findings=<0|1>`, then the
//! suite's KTAP, `@@DMIRROR DMESG <suite>`, the kernel log the suite caused,
//! `@@DMIRROR END <suite> rc=<n>`; `@@DMIRROR DONE` closes the run. The boot
//! log comes first as the suite `boot`.

/// What the guest reported for one suite.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SuiteOutput {
    /// The suite's name.
    pub name: String,
    /// Whether its results gate the run.
    pub gated: bool,
    /// Whether the suite is meant to cause kernel reports (the bench's
    /// self-check).
    pub expect_findings: bool,
    /// Its stdout and stderr (KTAP and diagnostics).
    pub output: String,
    /// The kernel log captured after it.
    pub dmesg: String,
    /// Its exit status; `None` when the END marker never came.
    pub rc: Option<i32>,
}

/// The whole stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stream {
    /// The kernel release the guest booted, from `@@DMIRROR BOOT`.
    pub kernel: Option<String>,
    /// The suites in the order they ran.
    pub suites: Vec<SuiteOutput>,
    /// Whether `@@DMIRROR DONE` came.
    pub done: bool,
}

const MARK: &str = "@@DMIRROR ";

#[derive(PartialEq)]
enum Part {
    Output,
    Dmesg,
}

fn flag(words: &[&str], key: &str) -> bool {
    words
        .iter()
        .any(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')) == Some("1"))
}

/// Parses the stream text.
pub fn parse(text: &str) -> Stream {
    let mut stream = Stream::default();
    let mut part = Part::Output;
    let mut open = false;
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        let Some(marker) = line.find(MARK).map(|i| &line[i + MARK.len()..]) else {
            if let Some(s) = stream.suites.last_mut().filter(|_| open) {
                let buf = if part == Part::Output { &mut s.output } else { &mut s.dmesg };
                buf.push_str(line);
                buf.push('\n');
            }
            continue;
        };
        let words: Vec<&str> = marker.split_whitespace().collect();
        match words.as_slice() {
            ["BOOT", release, ..] => stream.kernel = Some(release.to_string()),
            ["BEGIN", name, rest @ ..] => {
                stream.suites.push(SuiteOutput {
                    name: name.to_string(),
                    gated: flag(rest, "gated"),
                    expect_findings: flag(rest, "expect_findings"),
                    ..SuiteOutput::default()
                });
                open = true;
                part = Part::Output;
            }
            ["DMESG", name] => {
                // The boot log has no BEGIN: it is a gated suite of its own.
                if stream.suites.last().map(|s| s.name.as_str()) != Some(name) || !open {
                    stream.suites.push(SuiteOutput {
                        name: name.to_string(),
                        gated: true,
                        ..SuiteOutput::default()
                    });
                    open = true;
                }
                part = Part::Dmesg;
            }
            ["END", _name, rest @ ..] => {
                if let Some(s) = stream.suites.last_mut().filter(|_| open) {
                    s.rc = rest
                        .iter()
                        .find_map(|w| w.strip_prefix("rc="))
                        .and_then(|v| v.parse().ok());
                }
                open = false;
            }
            ["DONE", ..] => stream.done = true,
            _ => {}
        }
    }
    stream
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_suites() {
        let text = "@@DMIRROR BOOT 7.3.4-dmirror\r\n@@DMIRROR DMESG boot\r\n[0.1] hello\r\n@@DMIRROR END boot rc=0\r\n@@DMIRROR BEGIN a gated=1 expect_findings=0\r\nok 1 x\r\n@@DMIRROR DMESG a\r\n[1.0] k\r\n@@DMIRROR END a rc=3\r\n@@DMIRROR DONE\r\n";
        let s = parse(text);
        assert_eq!(s.kernel.as_deref(), Some("7.3.4-dmirror"));
        assert!(s.done);
        assert_eq!(s.suites.len(), 2);
        assert_eq!(s.suites[0].name, "boot");
        assert!(s.suites[0].gated);
        assert_eq!(s.suites[0].dmesg, "[0.1] hello\n");
        assert_eq!(s.suites[1].output, "ok 1 x\n");
        assert_eq!(s.suites[1].dmesg, "[1.0] k\n");
        assert_eq!(s.suites[1].rc, Some(3));
        assert!(s.suites[1].gated && !s.suites[1].expect_findings);
    }

    #[test]
    fn truncated_stream_leaves_suite_open() {
        let s = parse("@@DMIRROR BEGIN a gated=0 expect_findings=1\nok 1 x\n");
        assert!(!s.done);
        assert_eq!(s.suites[0].rc, None);
        assert!(!s.suites[0].gated);
        assert!(s.suites[0].expect_findings);
    }
}
