//! The kernel's mm selftests (scripts/build-mm-selftests, in /bin/mm), unchanged, each program
//! a subtest: its own KTAP indented by four, then one result line for the program from its exit
//! status (4 is kselftest's SKIP, a kill at its time limit a failure).
//!
//! Each program is listed with the directory it runs in, its time limit and its arguments,
//! chosen for TCG (docs/testing.md, "The kernel's mm selftests"). `dmirror.mm=NAME,...` runs
//! only the programs whose label contains one of the NAMEs.

use crate::{hmm, sys};
use dmirror_abi::ktap::Ktap;
use std::fs::File;
use std::io;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The own suite's ext4 image for the FS-DAX cases and gup_longterm's files, made on the host.
pub const FSDAX_IMAGE: &str = "/lib/fsdax.img.gz";

/// Writes [`FSDAX_IMAGE`] onto /dev/pmem0; `false` when there is no image or no /dev/pmem0.
pub fn write_fsdax_image() -> io::Result<bool> {
    if !Path::new("/dev/pmem0").exists() || !Path::new(FSDAX_IMAGE).exists() {
        return Ok(false);
    }
    let out = File::options().write(true).open("/dev/pmem0")?;
    let status = Command::new("zcat").arg(FSDAX_IMAGE).stdout(out).status()?;
    if status.success() {
        Ok(true)
    } else {
        Err(io::Error::other(format!("zcat {FSDAX_IMAGE}: {status}")))
    }
}

/// One row of the programs table.
enum Program {
    /// A program: its label, time limit in seconds, directory and command line.
    Run(String, u64, &'static str, Vec<String>),
    /// Left out: its label and why.
    Skip(String, String),
}

fn run(label: &str, secs: u64, dir: &'static str, cmd: &[&str]) -> Program {
    Program::Run(
        label.into(),
        secs,
        dir,
        cmd.iter().map(|s| s.to_string()).collect(),
    )
}

fn skip(label: &str, why: &str) -> Program {
    Program::Skip(label.into(), why.into())
}

/// A helper of this runner, as a program of the table (it runs under the same time limit).
const GUEST: &str = "/bin/dmirror-guest";

/// The cases `dmirror.crash` names (qemu/mm-selftests.crash, `LABEL.CASE`): on stock they take
/// the kernel down, so each runs alone in a crash boot and is left out of its program here.
fn crash_cases() -> Vec<String> {
    sys::arg_words("dmirror.crash", ',')
}

/// The programs of the mm selftests boot, without the cases `crash` names (on stock).
fn programs(crash: &[String]) -> Vec<Program> {
    let mut rows: Vec<Program> = Vec::new();
    let excluded = |label: &str| -> Vec<String> {
        crash
            .iter()
            .filter_map(|c| c.strip_prefix(label)?.strip_prefix('.'))
            // The harness's -T takes the case's own name, the last part of FIXTURE.VARIANT.CASE.
            .filter_map(|case| case.rsplit('.').next())
            .flat_map(|case| ["-T".to_owned(), case.to_owned()])
            .collect()
    };
    let (private, coherent) = (excluded("hmm-tests"), excluded("hmm-tests-coherent"));
    for c in crash {
        rows.push(skip(
            c,
            "takes the stock kernel down: runs alone, in a crash boot",
        ));
    }
    let hmm = |label: &str, keep: bool, left_out: Vec<String>, variants: [&str; 4]| {
        let mut cmd = vec![GUEST.to_owned(), "mm-hmm-tests".to_owned()];
        if keep {
            cmd.push("--keep".to_owned());
        }
        cmd.extend(["-T".to_owned(), "benchmark_thp_migration".to_owned()]);
        cmd.extend(left_out);
        cmd.extend(variants.iter().map(|s| s.to_string()));
        Program::Run(label.into(), 300, "/tmp", cmd)
    };
    rows.push(hmm(
        "hmm-tests",
        false,
        private,
        ["-V", "hmm_device_coherent", "-V", "hmm2_device_coherent"],
    ));
    rows.push(skip(
        "hmm-tests.hmm.hmm_device_private.benchmark_thp_migration",
        "a timing benchmark (60 s under TCG); make bench runs it",
    ));
    rows.push(skip(
        "folio_split_race_test",
        "100 iterations of 16 threads: over 200 s under TCG",
    ));
    rows.extend([
        run("cow", 400, "/tmp", &["/bin/mm/cow"]),
        run(
            "gup_test-u-n1",
            60,
            "/tmp",
            &["/bin/mm/gup_test", "-u", "-n", "1"],
        ),
        run(
            "gup_test-u-n-1",
            60,
            "/tmp",
            &["/bin/mm/gup_test", "-u", "-n", "-1"],
        ),
        run(
            "gup_test-a-n1",
            60,
            "/tmp",
            &["/bin/mm/gup_test", "-a", "-n", "1"],
        ),
        run(
            "gup_test-a-n-1",
            60,
            "/tmp",
            &["/bin/mm/gup_test", "-a", "-n", "-1"],
        ),
        run(
            "gup_test-L-w-n512",
            60,
            "/tmp",
            &["/bin/mm/gup_test", "-L", "-w", "-n", "512"],
        ),
        run(
            "gup_test-ct-dump",
            60,
            "/tmp",
            &["/bin/mm/gup_test", "-ct", "-F", "0x1", "0", "19", "0x1000"],
        ),
        run("gup_longterm", 200, "/tmp", &["/bin/mm/gup_longterm"]),
        run("gup_longterm-fsdax", 200, "/mnt/fsdax", &["/bin/mm/gup_longterm"]),
        // Every migration case migrates for 20 s (its RUNTIME); these three cover small pages,
        // THPs and shared THPs.
        run(
            "migration",
            200,
            "/tmp",
            &[
                "/bin/mm/migration",
                "-t",
                "private_anon",
                "-t",
                "private_anon_thp",
                "-t",
                "shared_anon_thp",
            ],
        ),
        skip(
            "migration.migration.shared_anon",
            "left out for guest time: 20 s of migration under TCG; private_anon and shared_anon_thp cover it",
        ),
        skip(
            "migration.migration.private_anon_htlb",
            "left out for guest time: 20 s of migration under TCG (hugetlb)",
        ),
        skip(
            "migration.migration.shared_anon_htlb",
            "left out for guest time: 20 s of migration under TCG (hugetlb)",
        ),
        run(
            "split_huge_page_test",
            300,
            "/tmp",
            &["/bin/mm/split_huge_page_test"],
        ),
        run(
            "ksm_tests-M",
            60,
            "/tmp",
            &["/bin/mm/ksm_tests", "-M", "-p", "10"],
        ),
        run("ksm_tests-U", 60, "/tmp", &["/bin/mm/ksm_tests", "-U"]),
        run(
            "ksm_tests-Z-z0",
            60,
            "/tmp",
            &["/bin/mm/ksm_tests", "-Z", "-p", "10", "-z", "0"],
        ),
        run(
            "ksm_tests-Z-z1",
            60,
            "/tmp",
            &["/bin/mm/ksm_tests", "-Z", "-p", "10", "-z", "1"],
        ),
        // The NUMA merging cases: see ksm_numa.
        run("ksm_tests-N-m1", 60, "/tmp", &[GUEST, "ksm-numa", "1"]),
        run("ksm_tests-N-m0", 60, "/tmp", &[GUEST, "ksm-numa", "0"]),
        // It runs itself again as ./ksm_functional_tests.
        run(
            "ksm_functional_tests",
            200,
            "/bin/mm",
            &["/bin/mm/ksm_functional_tests"],
        ),
        // With address space randomization off: see mremap.
        run("mremap_test", 200, "/tmp", &[GUEST, "mm-mremap"]),
        run("mremap_dontunmap", 60, "/tmp", &["/bin/mm/mremap_dontunmap"]),
        run("madv_populate", 60, "/tmp", &["/bin/mm/madv_populate"]),
    ]);
    // uffd-unit-tests takes over 200 s under TCG in all: the groups that touch COW, GUP pins,
    // THP moves and splits and poison, one run each (-f is a name filter).
    for f in [
        "register-ioctls",
        "zeropage",
        "move-pmd",
        "wp-fork",
        "wp-unpopulated",
        "minor",
        "poison",
        "mmap-changing",
    ] {
        rows.push(run(
            &format!("uffd-unit-tests-{f}"),
            120,
            "/tmp",
            &["/bin/mm/uffd-unit-tests", "-f", f],
        ));
    }
    rows.extend([
        skip(
            "uffd-unit-tests.move",
            "left out for guest time: 'move on anon' alone takes 60 s under TCG (move-pmd runs)",
        ),
        skip(
            "uffd-unit-tests.events",
            "left out for guest time: events and events-wp take 70 s under TCG",
        ),
        skip(
            "uffd-unit-tests.sigbus",
            "left out for guest time: sigbus and sigbus-wp take 17 s under TCG",
        ),
        skip(
            "uffd-unit-tests.rwp",
            "left out for guest time: the rwp-* groups take 37 s under TCG",
        ),
        run("mkdirty", 60, "/tmp", &["/bin/mm/mkdirty"]),
        run("rmap", 200, "/tmp", &["/bin/mm/rmap"]),
        run(
            "map_fixed_noreplace",
            60,
            "/tmp",
            &["/bin/mm/map_fixed_noreplace"],
        ),
        // The series' own selftest, on the second pmem range.
        run("devdax_unbind", 120, "/tmp", &[GUEST, "mm-devdax-unbind"]),
    ]);
    // hmm-tests' coherent variants last, and test_hmm left loaded after them: on the stock
    // kernel a coherent THP that was partly unmapped stays on the deferred split queue once
    // freed (what series patch 1 fixes), and once its device's range is unregistered the next
    // THP split in any program touches its freed struct page (the guest hung in cow's next
    // case).
    rows.push(hmm(
        "hmm-tests-coherent",
        true,
        coherent,
        ["-v", "hmm_device_coherent", "-v", "hmm2_device_coherent"],
    ));
    rows.push(skip(
        "hmm-tests-coherent.hmm.hmm_device_coherent.benchmark_thp_migration",
        "a timing benchmark; make bench runs it (its 256 MiB of single pages are more than a coherent device of test_hmm holds)",
    ));
    rows
}

/// The crash boot's one program: the hmm-tests case `dmirror.crash` names, on stock with
/// oops=panic and panic_on_warn=1: the crash that ends the boot is its result, which
/// `dmirror-bench mm --crash` reads. The patched kernel runs it with the rest.
fn crash_programs() -> Vec<Program> {
    let case = sys::arg("dmirror.crash").unwrap_or_default();
    let (label, name) = case.split_once('.').unwrap_or((&case, ""));
    vec![run(label, 120, "/tmp", &[GUEST, "mm-hmm-tests", "-r", name])]
}

/// Whether `label` is among the programs `dmirror.mm` selects (all without it).
fn selected(filter: &[String], label: &str) -> bool {
    filter.is_empty() || filter.iter().any(|f| label.contains(f.as_str()))
}

/// Runs one program of the table as test `k`'s next result.
fn run_program(k: &mut Ktap<io::Stdout>, label: &str, secs: u64, dir: &str, cmd: &[String]) {
    sys::kmsg(&format!(
        "dmirror-bench: mm-selftests {label} begins; {}",
        sys::memstate()
    ));
    let t0 = sys::uptime();
    // The program inherits the directory: this process runs one program at a time. (Not
    // `Command::current_dir`, nor a `chdir()` in `pre_exec`: with either, the spawn failed with
    // ENOSYS in the guest, where std's plain spawn works.)
    if let Err(e) = std::env::set_current_dir(dir) {
        k.comment(&format!("mm-selftests: {label}: cd {dir}: {e}"));
    }
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..]);
    let rc = sys::run_lines(&mut c, Duration::from_secs(secs), |l| {
        println!("    {l}");
        // Each case's start and result into the kernel log: dmesg.txt then times the cases.
        if ["# [RUN]", "#  RUN ", "ok ", "not ok "]
            .iter()
            .any(|p| l.starts_with(p))
        {
            sys::kmsg(&format!(
                "dmirror-bench: {label}: {}",
                l.strip_prefix("# ").unwrap_or(l)
            ));
        }
    });
    k.comment(&format!(
        "mm-selftests: {label} exit {rc} in {} s",
        sys::uptime() - t0
    ));
    match rc {
        0 => k.ok(label),
        4 => k.skip(label, "the program exited with kselftest's SKIP status"),
        sys::KILLED => k.result_with(false, label, &format!("killed after its {secs} s timeout")),
        _ => k.result_with(false, label, &format!("exit status {rc}")),
    }
}

/// The mm selftests, or with `crash` the crash boot's one case.
pub fn selftests(crash: bool) -> i32 {
    let filter = sys::arg_words("dmirror.mm", ',');
    // Huge pages for the hugetlb variants (cow, gup_longterm, migration, uffd-unit-tests): 96
    // of 2 MiB, given back after.
    let _ = sys::write_file("/proc/sys/vm/nr_hugepages", "96");
    // shm_open() for rmap.
    let _ = std::fs::create_dir_all("/dev/shm");
    let _ = sys::output("mount", &["-t", "tmpfs", "shm", "/dev/shm"]);
    // The FS-DAX mount for gup_longterm's files (the own suite's ext4 image).
    let _ = std::fs::create_dir_all("/mnt/fsdax");
    match write_fsdax_image() {
        Ok(false) => {}
        Ok(true) if sys::output("mount", &["-t", "ext4", "-o", "dax=always", "/dev/pmem0", "/mnt/fsdax"]).0 => {}
        _ => println!("# mounting /dev/pmem0 with -o dax=always failed"),
    }
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default().trim().to_owned();
    println!(
        "# NUMA nodes online: {}, CPUs: {}, huge pages: {}",
        read("/sys/devices/system/node/online"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        read("/proc/sys/vm/nr_hugepages")
    );
    let rows = if crash { crash_programs() } else { programs(&crash_cases()) };
    let label = |p: &Program| match p {
        Program::Run(l, ..) | Program::Skip(l, _) => l.clone(),
    };
    let rows: Vec<Program> = rows
        .into_iter()
        .filter(|p| selected(&filter, &label(p)))
        .collect();
    let mut k = Ktap::stdout();
    k.version();
    k.plan(rows.len());
    for p in &rows {
        match p {
            Program::Skip(label, why) => k.skip(label, why),
            Program::Run(label, secs, dir, cmd) => run_program(&mut k, label, *secs, dir, cmd),
        }
    }
    let _ = sys::output("umount", &["/mnt/fsdax"]);
    let _ = sys::output("umount", &["/dev/shm"]);
    let _ = sys::write_file("/proc/sys/vm/nr_hugepages", "0");
    0
}

/// Runs `program` with `args` and `file` set to `value`, then set back as it was; its exit
/// status.
fn with_setting(file: &str, value: &str, program: &str, args: &[&str]) -> i32 {
    let old = std::fs::read_to_string(file).unwrap_or_default();
    let _ = sys::write_file(file, value);
    let rc = sys::run(program, args);
    let _ = sys::write_file(file, old.trim());
    rc
}

/// ksm_tests' NUMA merging case with merge_across_nodes=`m`. merge_across_nodes cannot change
/// while KSM pages are shared, and the earlier tests' stable nodes go only when ksmd next
/// scans: everything is unmerged first (run=2 frees them), or the write fails at once with
/// EBUSY. The case then merges its two pages one after the other, waiting for two full scans
/// after each, and counts them; with smart scanning (on by default) ksmd skips a page that has
/// stayed unmerged for three visits, so the first page may be skipped in the scans that visit
/// the second, and the pages stay apart (seen at random on either kernel, both pages counted
/// as volatile after hundreds of full scans). Smart scanning is off for these cases, and back
/// as it was after; KSM's counters are printed (-d).
pub fn ksm_numa(m: &str) -> i32 {
    let _ = sys::write_file("/sys/kernel/mm/ksm/run", "2");
    with_setting(
        "/sys/kernel/mm/ksm/smart_scan",
        "0",
        "/bin/mm/ksm_tests",
        &["-N", "-m", m, "-d"],
    )
}

/// mremap_test's "with 40MB Preamble" case checks that its destination is free, but maps the
/// preamble below it without looking: with address space randomization the preamble now and
/// then met a mapping of the program's ("Failed to map dest preamble region: File exists", on
/// either kernel). It runs with randomization off, one layout on both kernels, and back after.
pub fn mremap() -> i32 {
    with_setting(
        "/proc/sys/kernel/randomize_va_space",
        "0",
        "/bin/mm/mremap_test",
        &[],
    )
}

/// devdax_unbind on the second pmem range, made a device-DAX namespace for it and raw again
/// after (the own suite's [`dmirror_suite::dax::with_devdax`]).
pub fn devdax_unbind() -> i32 {
    let mut rc = 0;
    let done = dmirror_suite::dax::with_devdax(|path| {
        let dax = path.trim_start_matches("/dev/");
        rc = sys::run("/bin/mm/devdax_unbind", &[dax]);
        Ok(())
    });
    match done {
        Ok(()) => rc,
        Err(dmirror_suite::harness::Fail::Skip(why)) => {
            println!("1..0 # SKIP {why}");
            4
        }
        Err(dmirror_suite::harness::Fail::Fail(why)) => {
            println!("# {why}");
            1
        }
    }
}

/// Upstream hmm-tests against the C test_hmm.ko (its device-coherent devices work with the
/// series' test_hmm patches), with `args` (`--keep` first: leave test_hmm loaded after, see
/// `programs`).
pub fn hmm_tests(args: &[String]) -> i32 {
    let (keep, args) = match args.first().map(String::as_str) {
        Some("--keep") => (true, &args[1..]),
        _ => (false, args),
    };
    if !hmm::load_test_hmm() {
        return 1;
    }
    let rc = sys::run("/bin/hmm-tests", args);
    if keep {
        rc
    } else {
        hmm::unload("test_hmm", rc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(rows: &[Program], label: &str) -> String {
        rows.iter()
            .find_map(|p| match p {
                Program::Run(l, _, _, cmd) if l == label => Some(cmd.join(" ")),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no program {label}"))
    }

    #[test]
    fn a_crash_case_is_left_out_of_its_own_program_only() {
        let crash = [
            "hmm-tests.hmm.hmm_device_private.migrate_anon_huge_err_fork".to_owned(),
            "hmm-tests-coherent.hmm.hmm_device_coherent.migrate_partial_unmap_back".to_owned(),
        ];
        let rows = programs(&crash);
        let private = command(&rows, "hmm-tests");
        let coherent = command(&rows, "hmm-tests-coherent");
        assert!(private.contains(" -T migrate_anon_huge_err_fork "), "{private}");
        assert!(!private.contains("migrate_partial_unmap_back"), "{private}");
        assert!(coherent.contains(" -T migrate_partial_unmap_back "), "{coherent}");
        assert!(!coherent.contains("err_fork"), "{coherent}");
        for c in &crash {
            assert!(rows.iter().any(|p| matches!(p, Program::Skip(l, _) if l == c)), "no skip row {c}");
        }
        let plain = programs(&[]);
        assert!(!command(&plain, "hmm-tests").contains("err_fork"));
        assert_eq!(plain.len() + crash.len(), rows.len());
    }

    #[test]
    fn labels_are_unique() {
        let rows = programs(&[]);
        let mut labels: Vec<&str> = rows
            .iter()
            .map(|p| match p {
                Program::Run(l, ..) | Program::Skip(l, _) => l.as_str(),
            })
            .collect();
        let n = labels.len();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), n);
    }
}
