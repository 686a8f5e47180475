//! A kselftest-style harness: cases with variants, one forked child per case with its own
//! timeout, SKIP with a reason, KTAP on stdout, `-t NAME` to filter, `-l` to list.
//!
//! Around every case the parent reads the kernel log the case caused (from `/dev/kmsg`) and
//! fails the case on any kernel report; for a device variant it also checks the device's
//! counters before and after: nothing allocated, every free page at refcount zero.

use crate::inspect::{self, Kmsg};
use dmirror_abi::ktap::Ktap;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Why a case did not pass.
#[derive(Debug)]
pub enum Fail {
    /// It cannot run here; the reason says why.
    Skip(String),
    /// An assertion failed.
    Fail(String),
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::Fail(format!("unexpected error: {e}"))
    }
}

/// A case's result.
pub type R<T = ()> = Result<T, Fail>;

/// Fails the case with a message unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::harness::Fail::Fail(format!($($arg)+)));
        }
    };
}

/// Fails the case unless the two values are equal, printing both.
#[macro_export]
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($arg:tt)+) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err($crate::harness::Fail::Fail(format!(
                "{}: {:?} != {:?}", format!($($arg)+), l, r
            )));
        }
    }};
}

/// Prints a diagnostic line (`# ...`), part of the case's KTAP output.
#[macro_export]
macro_rules! diag {
    ($($arg:tt)+) => {
        println!("# {}", format!($($arg)+))
    };
}

/// The device kinds a device case runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `/dev/hmm_dmirror0`: device-private memory.
    Private,
    /// `/dev/hmm_dmirror2`: device-coherent memory on a reserved range.
    Coherent,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Private => "private",
            Variant::Coherent => "coherent",
        }
    }

    /// The device node's name, also its debugfs directory.
    pub fn device(self) -> &'static str {
        match self {
            Variant::Private => "hmm_dmirror0",
            Variant::Coherent => "hmm_dmirror2",
        }
    }
}

/// What a case runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fixture {
    /// Each device variant, with the module loaded.
    Device,
    /// Once, with the module loaded (the case may reload it; the harness restores it).
    Module,
    /// FS-DAX on `/dev/pmem0`.
    FsDax,
    /// Device-DAX.
    DevDax,
}

/// One test case.
#[derive(Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub fixture: Fixture,
    /// Seconds before the case is killed and fails.
    pub timeout: u64,
    pub run: fn(&Ctx) -> R,
}

/// How the suite loads the module.
pub struct Config {
    /// Path of `dmirror.ko`.
    pub module: String,
    /// Arguments of the standard load (the coherent ranges).
    pub args: Vec<String>,
    /// Seed of the random patterns.
    pub seed: u64,
    /// Load, use, unload cycles of `load_unload` (the soak runs more).
    pub cycles: u64,
}

/// What a running case gets.
pub struct Ctx<'a> {
    pub variant: Option<Variant>,
    pub config: &'a Config,
}

impl Ctx<'_> {
    /// The case's device variant (device cases only).
    pub fn variant(&self) -> Variant {
        self.variant.expect("a device case")
    }

    /// The device node of the case's variant.
    pub fn path(&self) -> String {
        format!("/dev/{}", self.variant().device())
    }
}

/// A planned run of one case.
struct Planned<'a> {
    name: String,
    case: &'a Case,
    variant: Option<Variant>,
}

fn plan(cases: &[Case]) -> Vec<Planned<'_>> {
    let mut out = Vec::new();
    for case in cases {
        match case.fixture {
            Fixture::Device => {
                for v in [Variant::Private, Variant::Coherent] {
                    out.push(Planned {
                        name: format!("dmirror.{}.{}", v.name(), case.name),
                        case,
                        variant: Some(v),
                    });
                }
            }
            Fixture::Module => out.push(Planned {
                name: format!("dmirror.{}", case.name),
                case,
                variant: None,
            }),
            Fixture::FsDax => out.push(Planned {
                name: format!("fsdax.{}", case.name),
                case,
                variant: None,
            }),
            Fixture::DevDax => out.push(Planned {
                name: format!("devdax.{}", case.name),
                case,
                variant: None,
            }),
        }
    }
    out
}

fn usage() -> ! {
    eprintln!(
        "usage: dmirror-suite [-l] [--regress] [-t NAME]... [--seed N] [--cycles N] [--module KO] [--arg ARG]...\n\
         \n\
         -l          list the cases\n\
         --regress   run the regression cases of the kernel fixes instead\n\
         -t NAME     run only cases whose name contains NAME (repeatable)\n\
         --seed N    seed of the random patterns (default: from the clock; printed)\n\
         --cycles N  load, use, unload cycles of load_unload (default 20)\n\
         --module KO dmirror.ko to load (default /lib/modules/dmirror.ko)\n\
         --arg ARG   a module argument of the standard load (repeatable)"
    );
    std::process::exit(2)
}

/// Runs the suite, `cases` or with `--regress` the `regress` cases; returns the exit status
/// (0: every case passed or skipped).
pub fn main(cases: &[Case], regress: &[Case]) -> i32 {
    let mut cases = cases;
    let mut list = false;
    let mut filters = Vec::new();
    let mut config = Config {
        module: "/lib/modules/dmirror.ko".into(),
        args: Vec::new(),
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        cycles: 20,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-l" => list = true,
            "--regress" => cases = regress,
            "-t" => filters.push(args.next().unwrap_or_else(|| usage())),
            "--seed" => {
                config.seed = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--cycles" => {
                config.cycles = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| usage())
            }
            "--module" => config.module = args.next().unwrap_or_else(|| usage()),
            "--arg" => config.args.push(args.next().unwrap_or_else(|| usage())),
            _ => usage(),
        }
    }
    let planned: Vec<_> = plan(cases)
        .into_iter()
        .filter(|p| filters.is_empty() || filters.iter().any(|f| p.name.contains(f.as_str())))
        .collect();
    if list {
        for p in &planned {
            println!("{}", p.name);
        }
        return 0;
    }

    let mut k = Ktap::stdout();
    k.version();
    k.comment(&format!(
        "dmirror-suite: seed {} (replay with --seed {})",
        config.seed, config.seed
    ));
    k.plan(planned.len());
    let mut kmsg = Kmsg::open();
    let mut loaded_ok = inspect::ensure_loaded(&config).is_ok();
    for p in &planned {
        let started = Instant::now();
        let outcome = if !loaded_ok {
            Err(Fail::Fail("dmirror.ko could not be loaded".into()))
        } else {
            run_one(p, &config, &mut kmsg)
        };
        let took = started.elapsed();
        match outcome {
            Ok(()) => k.ok_in(&p.name, took),
            Err(Fail::Skip(why)) => k.skip(&p.name, &why),
            Err(Fail::Fail(why)) => {
                k.diag(&why);
                k.not_ok(&p.name);
            }
        }
        // A case that reloads the module restores it; if it could not, say so once.
        if loaded_ok && inspect::ensure_loaded(&config).is_err() {
            k.comment("dmirror.ko is gone and could not be reloaded");
            loaded_ok = false;
        }
    }
    let _ = inspect::unload();
    k.comment(&format!(
        "dmirror-suite: {} cases, {} failed, seed {}",
        planned.len(),
        k.failed(),
        config.seed
    ));
    i32::from(k.failed() > 0)
}

/// Runs one case in a forked child, then checks what it left behind.
fn run_one(p: &Planned<'_>, config: &Config, kmsg: &mut Kmsg) -> R {
    if let Some(v) = p.variant {
        if !std::path::Path::new(&format!("/dev/{}", v.device())).exists() {
            return Err(Fail::Skip(format!(
                "no /dev/{} (the module has no {} device here)",
                v.device(),
                v.name()
            )));
        }
        inspect::settled(v, 0).map_err(|e| match e {
            Fail::Fail(m) => Fail::Fail(format!("before the case: {m}")),
            s => s,
        })?;
    }
    kmsg.skip_to_end();
    let ctx = Ctx {
        variant: p.variant,
        config,
    };
    let result = fork_case(p.case, &ctx);
    let reports = kmsg.reports();
    let result = match (result, reports.is_empty()) {
        (r, true) => r,
        (Err(Fail::Fail(m)), false) => Err(Fail::Fail(format!(
            "{m}\nkernel reports:\n{}",
            reports.join("\n")
        ))),
        (_, false) => Err(Fail::Fail(format!(
            "kernel reports during the case:\n{}",
            reports.join("\n")
        ))),
    };
    result?;
    if let Some(v) = p.variant {
        // The case's processes are gone: every page they had on the device is free again.
        inspect::settled(v, 0).map_err(|e| match e {
            Fail::Fail(m) => Fail::Fail(format!("after the case exited: {m}")),
            s => s,
        })?;
    }
    Ok(())
}

/// Runs `case` in a child process (its own process group) under its timeout.
fn fork_case(case: &Case, ctx: &Ctx<'_>) -> R {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: Both descriptors were just created and are owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let _ = std::io::stdout().flush();
    // SAFETY: The harness is single-threaded; the child only runs the case and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if pid == 0 {
        drop(rd);
        // SAFETY: Plain system calls in the child.
        unsafe { libc::setpgid(0, 0) };
        let result = std::panic::catch_unwind(|| (case.run)(ctx));
        let (code, msg) = match result {
            Ok(Ok(())) => (b'P', String::new()),
            Ok(Err(Fail::Skip(m))) => (b'S', m),
            Ok(Err(Fail::Fail(m))) => (b'F', m),
            Err(_) => (b'F', "the case panicked".to_string()),
        };
        let mut f = std::fs::File::from(wr);
        let _ = f.write_all(&[code]);
        let _ = f.write_all(msg.as_bytes());
        drop(f);
        let _ = std::io::stdout().flush();
        // SAFETY: Ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(0) };
    }
    drop(wr);
    // SAFETY: `pid` is our child; also set here to close the race with its own setpgid().
    unsafe { libc::setpgid(pid, pid) };
    let deadline = Instant::now() + Duration::from_secs(case.timeout);
    let mut status = 0;
    let timed_out = loop {
        // SAFETY: Waits for our own child without blocking.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break false;
        }
        if Instant::now() >= deadline {
            // SAFETY: Kills the case's process group, then reaps the child.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            break true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Grandchildren the case left behind go with it.
    // SAFETY: Signals the case's own process group.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let mut out = Vec::new();
    let _ = std::fs::File::from(rd).read_to_end(&mut out);
    if timed_out {
        return Err(Fail::Fail(format!("timed out after {} s", case.timeout)));
    }
    let msg = String::from_utf8_lossy(out.get(1..).unwrap_or_default()).into_owned();
    match out.first() {
        Some(b'P') => Ok(()),
        Some(b'S') => Err(Fail::Skip(msg)),
        Some(b'F') => Err(Fail::Fail(msg)),
        _ => Err(Fail::Fail(format!(
            "the case died without a result (wait status {status:#x})"
        ))),
    }
}
