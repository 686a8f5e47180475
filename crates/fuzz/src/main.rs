//! dmirror-fuzz: a bounded, seeded fuzzer of dmirror's ioctls, run as root in the bench guest.
//!
//! `dmirror-fuzz [--calls N] [--seed N] [--threads N] [--module KO] [--arg ARG]... [--stuck-secs N]`
//!
//! It loads `dmirror.ko` itself (with the coherent ranges given as `--arg`), then:
//!
//! 1. probes every command on every device node with the largest `npages` (see [`probe`]);
//! 2. forks the worker (see [`worker`]), which makes `--calls` random calls (default 100 000)
//!    from `--threads` threads (default 3) with random and boundary values in every field of
//!    every command, and unknown commands, on every node, over an arena of every kind of
//!    mapping (see [`arena`]), and checks each answer (see [`call`]); a watchdog here fails
//!    the run and names the call if one takes 30 s, or if no call completes for 30 s, with the
//!    kernel stack of each of the worker's tasks (and every blocked task in the kernel log,
//!    through sysrq `w`), then kills them;
//! 3. checks that the worker's checked memory is intact, that the kernel logged no report,
//!    that every device has nothing allocated and passes its refcount check once the worker
//!    is gone, and that the module unloads.
//!
//! KTAP on stdout: one test per step and per category of calls (the three refusals before the
//! range is looked at, then one per command), each with its counts by result and the first
//! violations, which name the call and the seed.

mod arena;
mod call;
mod probe;
mod shared;
mod worker;

use dmirror_abi::ktap::Ktap;
use dmirror_suite::harness::Fail;
use dmirror_suite::inspect::{self, Kmsg};
use shared::{errno_name, now_ns, Shared, CATEGORIES, CAT_HUGE, ERRNOS, PROBE_SLOTS, SLOTS};
use std::io::{Stdout, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Seconds a call may take, and seconds without any call completing, before the watchdog
/// fails the run (`--stuck-secs`).
const STUCK_SECS: u64 = 30;
/// Seconds the worker may take to check its memory after the last call.
const FINAL_SECS: u64 = 120;
/// How often the watchdog prints the progress of the random phase.
const PROGRESS_NS: u64 = 10_000_000_000;

struct Opts {
    calls: u64,
    seed: u64,
    threads: usize,
    /// Path of `dmirror.ko`.
    module: String,
    /// Its arguments (the coherent ranges).
    args: Vec<String>,
    /// The watchdog's limit, in seconds.
    stuck_secs: u64,
}

/// Prints the usage and exits.
fn usage() -> ! {
    eprintln!(
        "usage: dmirror-fuzz [--calls N] [--seed N] [--threads N] [--module KO] [--arg ARG]...\n\
         [--stuck-secs N]\n\
         \n\
         --calls N    calls of the random phase (default 100000)\n\
         --seed N     seed of every random choice (default: the clock; printed)\n\
         --threads N  calling threads, 1 to 16 (default 3)\n\
         --module KO  dmirror.ko to load (default /lib/modules/dmirror.ko)\n\
         --arg ARG    a module argument (repeatable): the coherent ranges\n\
         --stuck-secs N  seconds a call may take, and without any call completing, before\n\
                      the watchdog fails the run (default 30; more for a slow kernel)"
    );
    std::process::exit(2)
}

/// The command line's options.
fn parse_args() -> Opts {
    let mut o = Opts {
        calls: 100_000,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        threads: 3,
        module: "/lib/modules/dmirror.ko".into(),
        args: Vec::new(),
        stuck_secs: STUCK_SECS,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--calls" => o.calls = value().parse().unwrap_or_else(|_| usage()),
            "--seed" => o.seed = value().parse().unwrap_or_else(|_| usage()),
            "--threads" => o.threads = value().parse().unwrap_or_else(|_| usage()),
            "--module" => o.module = value(),
            "--arg" => o.args.push(value()),
            "--stuck-secs" => o.stuck_secs = value().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    if !(1..=16).contains(&o.threads) {
        usage();
    }
    o
}

/// Loads the module afresh with its arguments; the error is insmod's message.
fn load(o: &Opts) -> Result<(), String> {
    let fail = |e: Fail| match e {
        Fail::Fail(m) | Fail::Skip(m) => m,
    };
    if inspect::loaded() {
        inspect::unload().map_err(fail)?;
    }
    inspect::load(&o.module, &o.args).map_err(fail)
}

/// Prints test `name`: its diagnostics, then its result.
fn result(k: &mut Ktap<Stdout>, name: &str, ok: bool, diag: &[String]) {
    for d in diag {
        k.diag_of(name, d);
    }
    k.result(ok, name);
}

/// The tests, in order.
const TESTS: usize = 1 + 1 + 13 + 5;

fn main() {
    let opts = parse_args();
    let shared = Shared::new();
    let mut kmsg = Kmsg::open();
    kmsg.skip_to_end();
    let started = Instant::now();
    let mut k = Ktap::stdout();
    k.version();
    k.comment(&format!(
        "dmirror-fuzz: seed {} (replay with --seed {}), {} calls, {} threads",
        opts.seed, opts.seed, opts.calls, opts.threads
    ));
    k.plan(TESTS);

    // 1: a fresh load with the coherent ranges.
    let loaded = load(&opts);
    let devices: Vec<usize> = (0..4)
        .filter(|d| std::path::Path::new(&format!("/dev/hmm_dmirror{d}")).exists())
        .collect();
    match loaded {
        Err(m) => {
            result(&mut k, "load", false, &[m]);
            for _ in 2..=TESTS {
                k.result_with(false, "skipped", "dmirror.ko did not load");
            }
            std::process::exit(1);
        }
        Ok(()) => {
            let d: Vec<String> = devices.iter().map(|d| format!("hmm_dmirror{d}")).collect();
            result(
                &mut k,
                "load",
                !devices.is_empty(),
                &[format!("device nodes: {}", d.join(" "))],
            );
        }
    }

    // 2: the largest npages.
    let (lines, returned) = probe::run(shared, &devices);
    let mut diag = vec![results(shared, CAT_HUGE)];
    diag.extend(lines);
    diag.extend(shared.violations(CAT_HUGE));
    let violations = shared.categories[CAT_HUGE]
        .violations
        .load(Ordering::Relaxed);
    result(&mut k, "huge_npages", returned && violations == 0, &diag);
    let hung = shared.hung.load(Ordering::Relaxed);
    for nr in 0..10 {
        if hung & (1 << nr) != 0 {
            println!(
                "# random phase: npages of {} at most {} (it hung with the largest)",
                call::name(nr),
                call::HUNG_CAP
            );
        }
    }

    // The random phase, in a process of its own.
    let phase_started = Instant::now();
    let _ = std::io::stdout().flush();
    // SAFETY: The supervisor is single-threaded; the child runs the worker and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: Makes the worker a process group leader, so that its children go with it.
        unsafe { libc::setpgid(0, 0) };
        worker::run(
            shared,
            &worker::Opts {
                calls: opts.calls,
                threads: opts.threads,
                seed: opts.seed,
                devices: devices.clone(),
            },
        );
    }
    let (stuck, status) = watch(shared, pid, opts.stuck_secs);
    let phase_secs = phase_started.elapsed().as_secs_f64();

    // 3..15: the categories.
    for (cat, name) in CATEGORIES.iter().enumerate().take(CAT_HUGE) {
        let c = &shared.categories[cat];
        let calls = c.calls.load(Ordering::Relaxed);
        let violations = c.violations.load(Ordering::Relaxed);
        let mut diag = vec![results(shared, cat)];
        if violations > 0 {
            diag.push(format!("{violations} calls got an answer they must not"));
        }
        if calls == 0 {
            diag.push("no call of this kind was made".into());
        }
        diag.extend(shared.violations(cat));
        result(&mut k, name, calls > 0 && violations == 0, &diag);
    }

    // 16: nothing hung.
    let mut diag = stuck.clone();
    if status != Some(0) {
        diag.push(format!("the worker ended with wait status {status:x?}"));
    }
    result(&mut k, "no_hang", stuck.is_empty() && status == Some(0), &diag);

    // 17: the worker's memory.
    let (ok, text) = shared
        .arena()
        .unwrap_or((false, "the worker did not get to check its memory".into()));
    result(&mut k, "arena_intact", ok, &[text]);

    // 18: the kernel log.
    let reports = kmsg.reports();
    let mut diag: Vec<String> = reports.iter().take(20).cloned().collect();
    if reports.len() > 20 {
        diag.push(format!("... {} reports in all", reports.len()));
    }
    result(&mut k, "kernel_log", reports.is_empty(), &diag);

    // 19: every device idle and consistent.
    let mut diag = Vec::new();
    let mut idle = true;
    for d in &devices {
        let name = format!("hmm_dmirror{d}");
        match inspect::settled_device(&name, 0) {
            Ok(s) => diag.push(format!(
                "{name}: allocated 0, check ok ({} chunks, {} evictions, {} splits)",
                s.get("chunks"),
                s.get("evictions"),
                s.get("splits")
            )),
            Err(Fail::Fail(m) | Fail::Skip(m)) => {
                idle = false;
                diag.push(m);
            }
        }
    }
    result(&mut k, "devices_idle", idle, &diag);

    // 20: the module unloads.
    let unloaded = inspect::unload().and_then(|()| {
        if inspect::loaded() {
            Err(Fail::Fail("still listed after rmmod".into()))
        } else {
            Ok(())
        }
    });
    match unloaded {
        Ok(()) => result(&mut k, "unload", true, &[]),
        Err(Fail::Fail(m) | Fail::Skip(m)) => {
            let mut diag = vec![m];
            if hung != 0 {
                diag.push("a probe call that never returned still holds a device".into());
            }
            result(&mut k, "unload", false, &diag)
        }
    }

    let calls = shared.calls.load(Ordering::Relaxed);
    let fuzz_secs = shared.fin.phase_ns.load(Ordering::Relaxed) as f64 / 1e9;
    println!(
        "# dmirror-fuzz: {calls} calls in {fuzz_secs:.1} s of calls ({:.0}/s; worker {phase_secs:.1} s, suite {:.1} s), {} forks, {} reopens, {} failed, seed {}",
        calls as f64 / fuzz_secs.max(1e-9),
        started.elapsed().as_secs_f64(),
        shared.fin.forks.load(Ordering::Relaxed),
        shared.fin.reopens.load(Ordering::Relaxed),
        k.failed(),
        opts.seed
    );
    std::process::exit(i32::from(k.failed() > 0))
}

/// Counts by result of a category, on one line.
fn results(shared: &Shared, cat: usize) -> String {
    let c = &shared.categories[cat];
    let by: Vec<String> = (0..ERRNOS)
        .filter_map(|e| {
            let n = c.results[e].load(Ordering::Relaxed);
            let us = c.results_ns[e].load(Ordering::Relaxed) / 1000 / n.max(1);
            (n > 0).then(|| format!("{} {n} ({us} us)", errno_name(e as i32)))
        })
        .collect();
    let calls = c.calls.load(Ordering::Relaxed);
    format!(
        "{calls} calls, {:.1} s in all, {:.0} us on average: {}",
        c.ns.load(Ordering::Relaxed) as f64 / 1e9,
        c.ns.load(Ordering::Relaxed) as f64 / 1e3 / calls.max(1) as f64,
        if by.is_empty() {
            "-".into()
        } else {
            by.join(", ")
        }
    )
}

/// Frames of a task's kernel stack printed at most.
const STACK_FRAMES: usize = 24;

/// The kernel stack of every task of process group `pgid` (the worker, its threads and its
/// children), one line per frame, each task headed by its id, name and state.
fn stacks(pgid: i32) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return vec!["/proc is not readable: no stacks".into()];
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // The fields after the name, which may hold spaces and parentheses: state, ppid, pgrp.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
        if after.split_whitespace().nth(2).and_then(|g| g.parse().ok()) != Some(pgid) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let dir = t.path();
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            let (comm, after) = stat.rsplit_once(')').unwrap_or(("", ""));
            let comm = comm.split_once('(').map_or("?", |(_, c)| c);
            let state = after.split_whitespace().next().unwrap_or("?");
            let tid = t.file_name().to_string_lossy().into_owned();
            out.push(format!("task {tid} ({comm}) of process {pid}, state {state}:"));
            match std::fs::read_to_string(dir.join("stack")) {
                Ok(stack) => out.extend(
                    stack
                        .lines()
                        .take(STACK_FRAMES)
                        .map(|l| format!("  {}", l.trim())),
                ),
                Err(e) => out.push(format!("  (no stack: {e})")),
            }
        }
    }
    out
}

/// Waits for the worker; returns the calls that got stuck (if the watchdog fired) and the
/// worker's wait status (`None` if it could not be reaped).
fn watch(shared: &Shared, pid: i32, stuck_secs: u64) -> (Vec<String>, Option<i32>) {
    let limit = stuck_secs * 1_000_000_000;
    let mut last_calls = 0;
    let mut last_progress = now_ns();
    let mut phase_over_at = None;
    let started = now_ns();
    let mut next_progress = started + PROGRESS_NS;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if now_ns() >= next_progress {
            next_progress += PROGRESS_NS;
            println!(
                "# progress: {:.0} s, {} calls",
                (now_ns() - started) as f64 / 1e9,
                shared.calls.load(Ordering::Relaxed)
            );
            let _ = std::io::stdout().flush();
        }
        let mut status = 0;
        // SAFETY: Polls our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            return (Vec::new(), Some(status));
        }
        let now = now_ns();
        let calls = shared.calls.load(Ordering::Relaxed);
        if calls != last_calls {
            last_calls = calls;
            last_progress = now;
        }
        let mut stuck: Vec<String> = shared.slots[..PROBE_SLOTS.min(SLOTS)]
            .iter()
            .filter_map(|s| s.stuck(limit))
            .collect();
        let over = shared.fin.phase_ns.load(Ordering::Relaxed) != 0;
        if over {
            let at = *phase_over_at.get_or_insert(now);
            if now - at > FINAL_SECS * 1_000_000_000 {
                stuck.push(format!(
                    "the worker did not finish its checks in {FINAL_SECS} s"
                ));
            }
        } else if now - last_progress > limit {
            stuck.push(format!(
                "no call completed for {stuck_secs} s ({calls} calls made)"
            ));
        }
        if stuck.is_empty() {
            continue;
        }
        shared.stop.store(true, Ordering::Relaxed);
        // Where the worker's tasks are, before they are killed; and every blocked task of the
        // system into the kernel log, for the ones outside the worker (a kworker, a fault).
        stuck.extend(stacks(pid));
        let _ = std::fs::write("/proc/sysrq-trigger", "w");
        // SAFETY: Kills the worker's process group (its threads and children).
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: As above.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                return (stuck, Some(status));
            }
        }
        stuck.push("the worker could not be reaped (a call is still in the kernel)".into());
        return (stuck, None);
    }
}
