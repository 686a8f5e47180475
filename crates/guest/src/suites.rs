//! The suites, one table: those that are cases written here (loading, module parameters, the
//! canary, KUnit's results, kmemleak) and those that run a program (the own suite, the fuzzer,
//! the benchmark, the upstream selftest against either driver).
//!
//! Each prints KTAP on standard output and returns an exit status, non-zero when it could not
//! run. The runner gives it a time limit and captures the kernel log around it.

use crate::{hmm, mm, sys};
use dmirror_abi::{ktap::Ktap, layout};
use std::path::Path;

/// A suite: it prints KTAP and returns its exit status.
type Suite = fn() -> i32;

/// Every suite by name.
pub const SUITES: &[(&str, Suite)] = &[
    ("dmirror-load", dmirror_load),
    ("dmirror-params", dmirror_params),
    ("canary", canary),
    ("kunit", kunit),
    ("kmemleak", kmemleak),
    ("dmirror-suite", || dmirror_suite(&[])),
    ("dmirror-regress", || dmirror_suite(&["--regress"])),
    // The eviction cases alone, for `make demo`: pages and a THP on each device come back with
    // their data on RELEASE, on the last close and on rmmod, and past the device's capacity
    // MIGRATE_TO_DEV fails with ENOMEM, losing nothing.
    ("dmirror-evict", || {
        dmirror_suite(&["-t", "_with_pages", "-t", "capacity_enomem"])
    }),
    ("dmirror-fuzz", dmirror_fuzz),
    ("dmirror-soak", dmirror_soak),
    ("perf", perf),
    ("hmm-tests-dmirror", hmm::tests_dmirror),
    ("hmm-tests-c", hmm::tests_c),
    ("hmm-bench-c", || hmm::bench("test_hmm", false)),
    ("hmm-bench-dmirror", || hmm::bench("dmirror", false)),
    ("hmm-bench-dmirror-coherent", || hmm::bench("dmirror", true)),
    (dmirror_abi::MM_SUITE, || mm::selftests(false)),
    ("mm-crash", || mm::selftests(true)),
];

/// Runs suite `name`; `None` for an unknown one.
pub fn run(name: &str) -> Option<i32> {
    SUITES.iter().find(|(n, _)| *n == name).map(|(_, suite)| suite())
}

/// One result from what `step` returned: `ok`, or its output as diagnostics and `not ok`.
fn step(k: &mut Ktap<std::io::Stdout>, name: &str, step: Result<(), String>) {
    if let Err(why) = &step {
        k.diag(why);
    }
    k.result(step.is_ok(), name);
}

/// The module loads, creates nothing unexpected, and unloads cleanly.
fn dmirror_load() -> i32 {
    let mut k = Ktap::stdout();
    k.version();
    k.plan(4);
    step(&mut k, "insmod", sys::insmod("dmirror", &[]));
    step(
        &mut k,
        "listed",
        sys::loaded("dmirror")
            .then_some(())
            .ok_or("not in /proc/modules".into()),
    );
    step(&mut k, "rmmod", sys::rmmod("dmirror"));
    step(
        &mut k,
        "gone",
        (!sys::loaded("dmirror"))
            .then_some(())
            .ok_or("still in /proc/modules".into()),
    );
    0
}

/// A module load with bad parameters: it must fail with a clear message naming the problem
/// (`want`, after `dmirror: ` in the kernel log), leave nothing loaded, and warn about nothing
/// (the runner's kernel-log gate).
fn refused(args: &[String], want: &str) -> Result<String, String> {
    let _ = sys::dmesg(true);
    if sys::insmod("dmirror", args).is_ok() {
        let _ = sys::rmmod("dmirror");
        return Err(format!("insmod {} succeeded", args.join(" ")));
    }
    if sys::loaded("dmirror") {
        return Err("dmirror is loaded after a failed insmod".into());
    }
    let log = sys::dmesg(false);
    let said: Vec<&str> = log.lines().filter(|l| l.contains("dmirror: ")).collect();
    if said
        .iter()
        .any(|l| l.split_once("dmirror: ").is_some_and(|(_, m)| m.contains(want)))
    {
        Ok(said.join("\n"))
    } else {
        Err(format!("no 'dmirror: ...{want}' in the kernel log:\n{log}"))
    }
}

/// Module parameters: every kind of bad coherent range or fault window is refused; a good pair
/// of ranges loads and creates both coherent devices.
fn dmirror_params() -> i32 {
    let [(base0, _), (base1, _)] = layout::COHERENT;
    let sec = 0x800_0000u64;
    let a = |s: &[String]| s.to_vec();
    let cases: Vec<(&str, &str, Vec<String>)> = vec![
        (
            "base_without_size",
            "give both or neither",
            a(&[format!("coherent0_base={base0:#x}")]),
        ),
        (
            "size_without_base",
            "give both or neither",
            a(&["coherent1_size=0x10000000".into()]),
        ),
        (
            "misaligned_base",
            "not aligned",
            a(&[
                format!("coherent0_base={:#x}", base0 + 4096),
                format!("coherent0_size={sec:#x}"),
            ]),
        ),
        (
            "size_not_sections",
            "not aligned",
            a(&[
                format!("coherent0_base={base0:#x}"),
                "coherent0_size=0x1000000".into(),
            ]),
        ),
        (
            "system_ram",
            "overlaps System RAM",
            a(&[
                format!("coherent0_base={sec:#x}"),
                format!("coherent0_size={sec:#x}"),
            ]),
        ),
        (
            "past_reserved_end",
            "overlaps System RAM",
            a(&[
                format!("coherent1_base={base1:#x}"),
                "coherent1_size=0x20000000".into(),
            ]),
        ),
        (
            "not_reserved",
            "not a reserved range",
            a(&[
                "coherent0_base=0x800000000".into(),
                format!("coherent0_size={sec:#x}"),
            ]),
        ),
        (
            "wraps_around",
            "wraps around",
            a(&[
                "coherent0_base=0xfffffffff8000000".into(),
                "coherent0_size=0x10000000".into(),
            ]),
        ),
        (
            "ranges_overlap",
            "overlap",
            a(&[
                format!("coherent0_base={base0:#x}"),
                "coherent0_size=0x10000000".into(),
                format!("coherent1_base={base0:#x}"),
                format!("coherent1_size={sec:#x}"),
            ]),
        ),
        (
            "fault_around_zero",
            "fault_around=0 is not a power of two",
            a(&["fault_around=0".into()]),
        ),
        (
            "fault_around_not_power",
            "fault_around=3 is not a power of two",
            a(&["fault_around=3".into()]),
        ),
        (
            "fault_around_too_large",
            "fault_around=1024 is not a power of two in 1..512",
            a(&["fault_around=1024".into()]),
        ),
    ];
    let mut k = Ktap::stdout();
    k.version();
    k.plan(cases.len() + 1);
    for (name, want, args) in &cases {
        match refused(args, want) {
            Ok(said) => {
                k.diag(&said);
                k.ok(name);
            }
            Err(why) => {
                k.diag(&why);
                k.not_ok(name);
            }
        }
    }
    let good = sys::insmod("dmirror", &layout::dmirror_coherent_args()).and_then(|()| {
        let nodes = ["/dev/hmm_dmirror2", "/dev/hmm_dmirror3"];
        let missing: Vec<&str> = nodes.into_iter().filter(|n| !Path::new(n).exists()).collect();
        let unloaded = sys::rmmod("dmirror");
        if missing.is_empty() {
            unloaded
        } else {
            Err(format!("no {}", missing.join(", ")))
        }
    });
    step(&mut k, "good_ranges_load", good);
    0
}

/// The bench's self-check: a canary module that warns on load must be caught by the host's
/// kernel-log scan (the suite expects findings).
fn canary() -> i32 {
    let mut k = Ktap::stdout();
    k.version();
    k.plan(2);
    step(&mut k, "insmod", sys::insmod("bench_canary", &["warn=1".into()]));
    step(&mut k, "rmmod", sys::rmmod("bench_canary"));
    0
}

/// The KUnit suites built into the kernel (the Rust abstractions' tests among them), which ran
/// at boot, as one KTAP document: each suite's results file is a document with the suite as
/// its test 1, renumbered here.
fn kunit() -> i32 {
    let dir = "/sys/kernel/debug/kunit";
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.path().join("results")))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    println!("KTAP version 1");
    if files.is_empty() {
        println!("1..1");
        println!("# no KUnit results under {dir} (CONFIG_KUNIT_DEBUGFS?)");
        println!("not ok 1 kunit_results");
        return 0;
    }
    println!("1..{}", files.len());
    for (i, f) in files.iter().enumerate() {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        // Its header (version and plan) dropped, its result line numbered `i`.
        for l in text.lines().skip(2) {
            match l
                .strip_prefix("ok 1 ")
                .map(|r| ("ok", r))
                .or_else(|| Some(("not ok", l.strip_prefix("not ok 1 ")?)))
            {
                Some((status, rest)) => println!("{status} {} {rest}", i + 1),
                None => println!("{l}"),
            }
        }
    }
    0
}

/// Memory the suites leaked, on a kernel with kmemleak (the debug flavour). The runner cleared
/// what boot left; an object is reported once it has been unreferenced for 5 s and through a
/// scan, so: wait, scan twice, read.
fn kmemleak() -> i32 {
    let f = "/sys/kernel/debug/kmemleak";
    let mut k = Ktap::stdout();
    k.version();
    k.plan(1);
    if !Path::new(f).exists() {
        k.skip(
            "no_leaks",
            "this kernel has no kmemleak (KERNEL_FLAVOUR=debug has)",
        );
        return 0;
    }
    std::thread::sleep(std::time::Duration::from_secs(6));
    let _ = sys::write_file(f, "scan");
    let _ = sys::write_file(f, "scan");
    let leaks = std::fs::read_to_string(f).unwrap_or_default();
    if leaks.is_empty() {
        k.ok("no_leaks");
    } else {
        let n = leaks.matches("unreferenced object").count();
        k.comment(&format!("{n} unreferenced objects:"));
        k.diag(&leaks);
        // Also into the kernel log, where the run's scanner files them.
        let mut budget = 8000usize;
        for l in leaks.lines() {
            if budget < l.len() {
                break;
            }
            budget -= l.len() + 1;
            sys::kmsg(&format!("kmemleak report: {l}"));
        }
        k.not_ok("no_leaks");
    }
    0
}

/// `--arg A` for each of dmirror.ko's coherent parameters, and `--seed N` when the command
/// line gives one: what the own suite, the soak and the fuzzer load the module with.
fn module_args() -> Vec<String> {
    let mut args: Vec<String> = layout::dmirror_coherent_args()
        .into_iter()
        .flat_map(|a| ["--arg".to_owned(), a])
        .collect();
    if let Some(seed) = sys::arg("dmirror.seed") {
        args.extend(["--seed".to_owned(), seed]);
    }
    args
}

/// The own zero-refcount suite (crates/suite), with `first` before the standard arguments
/// (`--regress` for the regression cases of the kernel fixes); it loads dmirror.ko itself and
/// unloads it at the end. dmirror.suite=-t,NAME adds its arguments (`make check-dmirror
/// SUITE_ARGS=...`).
fn dmirror_suite(first: &[&str]) -> i32 {
    // The FS-DAX cases' ext4, made on the host, onto the first pmem region (the regression
    // cases do not use it).
    if first != ["--regress"] {
        if let Err(e) = mm::write_fsdax_image() {
            println!("# writing the FS-DAX image failed: {e}");
        }
    }
    let mut args: Vec<String> = first.iter().map(|s| s.to_string()).collect();
    args.extend(module_args());
    args.extend(sys::arg_words("dmirror.suite", ','));
    sys::run("/bin/dmirror-suite", &args)
}

/// The ioctl fuzzer (crates/fuzz); it loads dmirror.ko itself and unloads it at the end.
/// dmirror.fuzz=--calls,N adds its arguments (`make check-fuzz FUZZ_ARGS=...`).
fn dmirror_fuzz() -> i32 {
    let mut args = module_args();
    // The debug kernel (KASAN, lockdep, under TCG) runs a call several times slower: a
    // SNAPSHOT of a whole 2 GiB range takes over 30 s there.
    if sys::arg("dmirror.flavour").as_deref() == Some("debug") {
        args.extend(["--stuck-secs".to_owned(), "120".to_owned()]);
    }
    args.extend(sys::arg_words("dmirror.fuzz", ','));
    sys::run("/bin/dmirror-fuzz", &args)
}

/// The soak: the own suite's load_unload case with 200 cycles (dmirror.cycles=N for another
/// count), each checking that the counters come back to zero.
fn dmirror_soak() -> i32 {
    let mut args = module_args();
    let cycles = sys::arg("dmirror.cycles").unwrap_or_else(|| "200".into());
    args.extend([
        "--cycles".to_owned(),
        cycles,
        "-t".to_owned(),
        "load_unload".to_owned(),
    ]);
    sys::run("/bin/dmirror-suite", &args)
}

/// The benchmark (crates/perf): both drivers in turn, samples as KTAP comments.
/// dmirror.perf=--reps~N adds its arguments (`make bench PERF_ARGS=...`).
fn perf() -> i32 {
    let mut args = Vec::new();
    if let Some(seed) = sys::arg("dmirror.seed") {
        args.extend(["--seed".to_owned(), seed]);
    }
    args.extend(sys::arg_words("dmirror.perf", '~'));
    sys::run("/bin/dmirror-perf", &args)
}
