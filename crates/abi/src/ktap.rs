//! The KTAP writer of the guest programs and the host's compile-fail suite.
//!
//! The host's parser (`crates/bench/src/ktap.rs`) reads what this writes:
//!
//! ```text
//! KTAP version 1
//! # a comment
//! 1..3
//! ok 1 first # 1.2s
//! # second: why it failed
//! not ok 2 second
//! ok 3 third # SKIP why it cannot run here
//! ```

use std::io::{self, Write};
use std::time::Duration;

/// Writes one KTAP document: the results are numbered in the order they are written, and
/// every line is flushed as it is written, so that a crash afterwards loses none of them.
///
/// # Panics
///
/// Like `println!`, each method panics if the output cannot be written.
pub struct Ktap<W: Write> {
    out: W,
    /// Results written.
    tests: usize,
    /// `not ok` results written.
    failed: usize,
}

impl Ktap<io::Stdout> {
    /// A writer to standard output, which may be shared with `println!`.
    pub fn stdout() -> Self {
        Self::new(io::stdout())
    }
}

impl Ktap<Vec<u8>> {
    /// A writer into memory; [`Ktap::into_string`] gives the document.
    pub fn buffer() -> Self {
        Self::new(Vec::new())
    }

    /// The document written.
    pub fn into_string(self) -> String {
        // Only `&str`s went in.
        String::from_utf8_lossy(&self.out).into_owned()
    }
}

impl<W: Write> Ktap<W> {
    /// A writer to `out`, with no line written yet.
    pub fn new(out: W) -> Self {
        Self {
            out,
            tests: 0,
            failed: 0,
        }
    }

    /// Writes one line and flushes it.
    fn line(&mut self, args: std::fmt::Arguments<'_>) {
        if let Err(e) = writeln!(self.out, "{args}").and_then(|()| self.out.flush()) {
            panic!("failed writing KTAP: {e}");
        }
    }

    /// The header: `KTAP version 1`.
    pub fn version(&mut self) {
        self.line(format_args!("KTAP version 1"));
    }

    /// The plan: `1..tests`.
    pub fn plan(&mut self, tests: usize) {
        self.line(format_args!("1..{tests}"));
    }

    /// A comment line, `# text`, with `text` as it is (one line).
    pub fn comment(&mut self, text: &str) {
        self.line(format_args!("# {text}"));
    }

    /// Diagnostics: `# line` for each line of `text` (none for an empty one).
    pub fn diag(&mut self, text: &str) {
        for l in text.lines() {
            self.line(format_args!("# {l}"));
        }
    }

    /// Diagnostics of test `name`: `# name: line` for each line of `text` (none for an
    /// empty one).
    pub fn diag_of(&mut self, name: &str, text: &str) {
        for l in text.lines() {
            self.line(format_args!("# {name}: {l}"));
        }
    }

    /// The next result: `ok N name` or `not ok N name`.
    pub fn result(&mut self, ok: bool, name: &str) {
        self.count(ok);
        let (status, n) = (status(ok), self.tests);
        self.line(format_args!("{status} {n} {name}"));
    }

    /// The next result with a directive: `ok N name # directive` (or `not ok`).
    pub fn result_with(&mut self, ok: bool, name: &str, directive: &str) {
        self.count(ok);
        let (status, n) = (status(ok), self.tests);
        self.line(format_args!("{status} {n} {name} # {directive}"));
    }

    /// A passed test: `ok N name`.
    pub fn ok(&mut self, name: &str) {
        self.result(true, name);
    }

    /// A passed test with its duration: `ok N name # 1.2s` (tenths of a second).
    pub fn ok_in(&mut self, name: &str, took: Duration) {
        self.result_with(true, name, &format!("{:.1}s", took.as_secs_f64()));
    }

    /// A failed test: `not ok N name`.
    pub fn not_ok(&mut self, name: &str) {
        self.result(false, name);
    }

    /// A skipped test: `ok N name # SKIP why`.
    pub fn skip(&mut self, name: &str, why: &str) {
        self.result_with(true, name, &format!("SKIP {why}"));
    }

    /// The end of a run that cannot go on: `Bail out! why`.
    pub fn bail_out(&mut self, why: &str) {
        self.line(format_args!("Bail out! {why}"));
    }

    /// The results written so far.
    pub fn tests(&self) -> usize {
        self.tests
    }

    /// The `not ok` results written so far.
    pub fn failed(&self) -> usize {
        self.failed
    }

    /// The output.
    pub fn into_inner(self) -> W {
        self.out
    }

    /// Counts the next result.
    fn count(&mut self, ok: bool) {
        self.tests += 1;
        self.failed += usize::from(!ok);
    }
}

/// The status word of a result.
fn status(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "not ok"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line() {
        let mut k = Ktap::buffer();
        k.version();
        k.comment("suite: seed 7");
        k.plan(5);
        k.ok_in("a", Duration::from_millis(1260));
        k.skip("b", "no device");
        k.diag("line one\nline two");
        k.not_ok("c");
        k.diag_of("d", "first\nsecond");
        k.result(true, "d");
        k.result_with(false, "skipped", "did not load");
        k.bail_out("cannot go on");
        assert_eq!((k.tests(), k.failed()), (5, 2));
        assert_eq!(
            k.into_string(),
            "KTAP version 1\n# suite: seed 7\n1..5\nok 1 a # 1.3s\nok 2 b # SKIP no device\n\
             # line one\n# line two\nnot ok 3 c\n# d: first\n# d: second\nok 4 d\n\
             not ok 5 skipped # did not load\nBail out! cannot go on\n"
        );
    }

    #[test]
    fn empty_diagnostics_write_nothing() {
        let mut k = Ktap::buffer();
        k.diag("");
        k.diag_of("a", "");
        k.comment("");
        assert_eq!(k.into_string(), "# \n");
    }
}
