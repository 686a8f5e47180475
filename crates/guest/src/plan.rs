//! The plans, one table, and the runner that goes through one.
//!
//! A plan (`dmirror.plan=` on the kernel command line, chosen by a `make` target) is a list of
//! suites. The runner runs each in a process of its own (`dmirror-guest suite NAME`) under the
//! suite time limit (`dmirror.suite_timeout`, 900 s unless given), and streams its output to
//! /dev/ttyS1 between marker lines that the host runner (`crates/bench/src/stream.rs`) parses:
//!
//! ```text
//! @@DMIRROR BEGIN <suite> gated=<0|1> expect_findings=<0|1>
//! ... the suite's KTAP output ...
//! @@DMIRROR DMESG <suite>
//! ... the kernel log the suite caused ...
//! @@DMIRROR END <suite> rc=<exit status>
//! @@DMIRROR DONE
//! ```
//!
//! The kernel console is ttyS0. Marker lines never contain the words the kernel-report scanner
//! looks for.

use crate::sys;
use dmirror_abi::MM_SUITE;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One suite of a plan.
#[derive(Clone, Copy)]
pub struct Step {
    /// Its name in the results.
    pub name: &'static str,
    /// The suite it runs ([`crate::suites::run`]).
    pub suite: &'static str,
    /// Whether its failures fail the run.
    pub gated: bool,
    /// Whether it is meant to cause a kernel report (the bench's self-check).
    pub expect_findings: bool,
    /// When it runs.
    pub when: When,
}

/// When a step of a plan runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum When {
    Always,
    /// With `dmirror.inject=warn` (`make test INJECT=warn`): a warning nobody expects, to show
    /// the gate.
    Injected,
    /// On the debug kernel (`dmirror.flavour=debug`).
    Debug,
}

impl Step {
    /// Its name, with its condition and whether it is gated, for `dmirror-guest plans`.
    pub fn describe(&self) -> String {
        let when = match self.when {
            When::Always => "",
            When::Injected => " (with INJECT=warn)",
            When::Debug => " (debug kernel)",
        };
        format!(
            "{}{}{when}",
            self.name,
            if self.gated { "" } else { " (not gated)" }
        )
    }
}

const fn gated(suite: &'static str) -> Step {
    Step {
        name: suite,
        suite,
        gated: true,
        expect_findings: false,
        when: When::Always,
    }
}

const fn ungated(suite: &'static str) -> Step {
    Step {
        gated: false,
        ..gated(suite)
    }
}

const fn when(when: When, step: Step) -> Step {
    Step { when, ..step }
}

/// The driver's own suites, in the order every plan that runs them runs them.
const DMIRROR: [Step; 6] = [
    gated("dmirror-load"),
    gated("dmirror-params"),
    gated("dmirror-suite"),
    gated("dmirror-regress"),
    gated("hmm-tests-dmirror"),
    gated("dmirror-fuzz"),
];

/// Every plan: its name, what it is for, its steps.
pub const PLANS: &[(&str, &str, &[Step])] = &[
    (
        "demo",
        "make demo: load dmirror, the eviction cases",
        &[gated("dmirror-load"), gated("dmirror-evict")],
    ),
    (
        "test",
        "make test: every gated suite of the patched kernel",
        &[
            Step {
                expect_findings: true,
                ..gated("canary")
            },
            Step {
                name: "injected-warning",
                ..when(When::Injected, gated("canary"))
            },
            gated("kunit"),
            DMIRROR[0],
            DMIRROR[1],
            DMIRROR[2],
            DMIRROR[3],
            DMIRROR[4],
            DMIRROR[5],
            // The debug kernel's soak: 200 load, use, unload cycles.
            when(When::Debug, gated("dmirror-soak")),
            gated("kmemleak"),
        ],
    ),
    (
        "dmirror",
        "make check-dmirror: the driver's suites alone",
        &[
            DMIRROR[0],
            DMIRROR[1],
            DMIRROR[2],
            DMIRROR[3],
            DMIRROR[4],
            DMIRROR[5],
            gated("kmemleak"),
        ],
    ),
    // Not gated: its failures and kernel reports are the reference's.
    (
        "reference",
        "make reference: the upstream selftest against the C test_hmm.ko",
        &[ungated("hmm-tests-c")],
    ),
    (
        "soak",
        "make soak: load, use, unload cycles, then the leak scan",
        &[gated("dmirror-soak"), gated("kmemleak")],
    ),
    // Not gated: what the regression cases show here, kernel reports included, is the bug;
    // `make test` compares them with the patched run.
    (
        "stock",
        "make stock: the regression cases on the stock kernel",
        &[ungated("dmirror-regress")],
    ),
    // Not gated here: `dmirror-bench mm` compares the two kernels' runs and fails on a
    // regression, an unexplained failure or a kernel report.
    (
        "mm",
        "make check-mm: the kernel's mm selftests, patched kernel",
        &[ungated(MM_SUITE)],
    ),
    (
        "mm-stock",
        "make stock-mm: the same on the stock kernel",
        &[ungated(MM_SUITE)],
    ),
    (
        "suite",
        "make check-suite: the own suite alone",
        &[gated("dmirror-suite")],
    ),
    (
        "fuzz",
        "make check-fuzz: the ioctl fuzzer alone",
        &[gated("dmirror-fuzz")],
    ),
    (
        "bench",
        "make bench: dmirror.ko against test_hmm.ko, then the upstream selftest's benchmark against each",
        &[
            gated("perf"),
            gated("hmm-bench-c"),
            gated("hmm-bench-dmirror"),
            gated("hmm-bench-dmirror-coherent"),
        ],
    ),
];

/// The crash boots (`mm-crash-N`): one of the series' selftests that take the stock kernel
/// down (`dmirror.crash`), with oops=panic and panic_on_warn=1; the crash that ends the boot is
/// its result.
const MM_CRASH: &[Step] = &[Step { name: MM_SUITE, ..ungated("mm-crash") }];

/// The steps of plan `name`; `None` for an unknown one.
pub fn steps(name: &str) -> Option<&'static [Step]> {
    if name.starts_with("mm-crash-") {
        return Some(MM_CRASH);
    }
    PLANS.iter().find(|(n, ..)| *n == name).map(|(.., steps)| *steps)
}

/// The host's end of the stream.
struct Stream(File);

impl Stream {
    fn open() -> std::io::Result<Self> {
        let tty = OpenOptions::new().write(true).open("/dev/ttyS1")?;
        // Raw: the host reads the bytes as written.
        // SAFETY: A termios of the open tty, read then written back changed.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(tty.as_raw_fd(), &mut t) == 0 {
                libc::cfmakeraw(&mut t);
                t.c_lflag &= !libc::ECHO;
                libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &t);
            }
        }
        Ok(Self(tty))
    }

    fn emit(&mut self, line: &str) {
        // The stream is all the host sees; a failed write leaves it incomplete, which the host
        // reports (no DONE).
        let _ = writeln!(self.0, "{line}");
    }

    /// The kernel log since the last read, emptied.
    fn dmesg(&mut self) {
        let _ = self.0.write_all(sys::dmesg(true).as_bytes());
    }
}

/// Runs plan `name`; returns when it is done (the caller powers off).
pub fn run(name: &str) -> Result<(), String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    println!("dmirror-bench: plan '{name}' on {release}");
    let mut out = Stream::open().map_err(|e| format!("/dev/ttyS1: {e}"))?;
    out.emit(&format!("@@DMIRROR BOOT {release}"));
    out.emit("@@DMIRROR DMESG boot");
    out.dmesg();
    out.emit("@@DMIRROR END boot rc=0");
    // What boot itself left is not the suites' leak: the kmemleak suite reports only what is
    // unreferenced after this point.
    let _ = sys::write_file("/sys/kernel/debug/kmemleak", "clear");

    if name == "shell" {
        let _ = Command::new("setsid")
            .args(["sh", "-c", "exec sh </dev/ttyS0 >/dev/ttyS0 2>&1"])
            .status();
    } else if let Some(steps) = steps(name) {
        let limit = Duration::from_secs(
            sys::arg("dmirror.suite_timeout")
                .and_then(|s| s.parse().ok())
                .unwrap_or(900),
        );
        let injected = sys::arg("dmirror.inject").as_deref() == Some("warn");
        let debug = sys::arg("dmirror.flavour").as_deref() == Some("debug");
        for step in steps {
            let runs = match step.when {
                When::Always => true,
                When::Injected => injected,
                When::Debug => debug,
            };
            if runs {
                run_step(&mut out, step, limit);
            }
        }
    } else {
        println!("dmirror-bench: unknown plan '{name}'");
    }
    out.emit("@@DMIRROR DONE");
    Ok(())
}

fn run_step(out: &mut Stream, step: &Step, limit: Duration) {
    let (name, suite) = (step.name, step.suite);
    let _ = sys::dmesg(true);
    sys::kmsg(&format!(
        "dmirror-bench: suite {name} begins; {}",
        sys::memstate()
    ));
    out.emit(&format!(
        "@@DMIRROR BEGIN {name} gated={} expect_findings={}",
        u8::from(step.gated),
        u8::from(step.expect_findings)
    ));
    let rc = match (out.0.try_clone(), out.0.try_clone()) {
        (Ok(o), Ok(e)) => {
            let mut cmd =
                Command::new(std::env::current_exe().unwrap_or_else(|_| "/bin/dmirror-guest".into()));
            cmd.args(["suite", suite])
                .stdin(Stdio::null())
                .stdout(o)
                .stderr(e);
            match sys::spawn_group(&mut cmd) {
                Ok(child) => sys::wait_limited(child, limit),
                Err(e) => {
                    out.emit(&format!("# running suite {suite}: {e}"));
                    1
                }
            }
        }
        _ => 1,
    };
    sys::kmsg(&format!("dmirror-bench: suite {name} ends; {}", sys::memstate()));
    out.emit(&format!("@@DMIRROR DMESG {name}"));
    out.dmesg();
    out.emit(&format!("@@DMIRROR END {name} rc={rc}"));
}
