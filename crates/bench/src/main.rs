//! `dmirror-bench`: boots the bench VM and judges what it printed.
//!
//! ```text
//! dmirror-bench run --plan P --kernel BZIMAGE --initrd CPIO [--timeout S]
//!                   [--results DIR] [--accel tcg|kvm|auto] [--smp N] [--numa N] [--append ARG]... [--host-ktap FILE]...
//!                   [--reuse]
//! dmirror-bench judge RESULTS_DIR
//! dmirror-bench report RESULTS_DIR
//! dmirror-bench regress PATCHED_DIR STOCK_DIR
//! dmirror-bench mm PATCHED_DIR STOCK_DIR --known FILE [--fixed FILE] [--crash-cases FILE --crash DIR...] [--reports-only]
//! dmirror-bench kcidb RESULTS_DIR [--stock STOCK_DIR] [--patches DIR] [--url-base URL]
//! dmirror-bench compile-fail --kdir KDIR --cases DIR --out DIR [--jobs N] [--timeout S]
//!                   [--make MAKE] [-- MAKE_ARG...]
//! ```
//!
//! `run` writes `DIR/<timestamp>-<plan>/` (console.log, stream.log,
//! dmesg.txt, one .ktap per suite, summary.json, run.json with how the guest was run and what
//! the kernel's build tree says of its build, kernel.config), points `DIR/latest` at it,
//! prints the verdicts and exits 0 only when every gated suite passed.
//! `judge` re-judges a saved run from its console.log and stream.log. A run of
//! the `bench` plan also writes its report to `<run>/bench/` (`report` redoes
//! that from the saved files). `regress` puts the regression suite's results of a
//! stock-kernel run beside the patched run's (`regress.md` in PATCHED_DIR) and prints the
//! patched run's gated totals with the regression verdicts added. `mm` puts the kernel's mm
//! selftests of a stock run beside a patched run's (`mm`): it writes `mm-selftests.md` and
//! `mm-selftests.json` into PATCHED_DIR, prints the cases that need a reader's eye and one summary
//! line, and exits 0 only when nothing regressed, every failure on both kernels has a reason in
//! the `--known` FILE, every case the `--fixed` FILE names (the series' own selftests) fails on
//! stock and passes patched, the patched suite caused no kernel report and both runs finished.
//! `--crash-cases FILE --crash DIR...` takes the stock outcome of the cases FILE names (selftests
//! that take the stock kernel down) from the stock boots that ran them, one each, in order, with
//! `oops=panic` and `panic_on_warn=1`: a crash while the case ran fails it on stock.
//! With `--reports-only` (a patched kernel of another configuration, such as the debug
//! flavour's) it judges only the patched run's kernel reports and completion, and shows the
//! comparison.
//!
//! `run --reuse` boots only when no earlier run of the plan in DIR had the same kernel image,
//! initramfs (by content), command line and machine and finished its plan; otherwise it
//! re-judges that run and points the `latest` links at it (`reuse`).
//!
//! `run --smp N` gives the guest N CPUs (default 2); `--numa N` splits its memory and CPUs into N
//! NUMA nodes (default: none).
//!
//! `compile-fail` builds every case of the compile-fail suite (`compile_fail`) against a kernel
//! tree with `MAKE -C KDIR MAKE_ARG... M=<dir> modules`, writes `OUT/compile-fail.ktap`, prints
//! one line per case and exits 0 only when every case passed. `run --host-ktap FILE` adds such a
//! KTAP file to the run as a gated suite named after the file (`compile-fail`): it is copied into
//! the run's directory and listed in its `host-suites`, which `judge` and `regress` read too.
//!
//! `kcidb` writes `RESULTS_DIR/kcidb.json`: the run's results as KCIDB I/O data (`kcidb`), with
//! the stock run's as a second build of the same checkout, the patchset hash of the `*.patch`
//! files of `--patches`, and links below `--url-base` (where `results/` is published). It
//! validates the file with `kcidb-io` when `scripts/setup` has installed it (SKIP otherwise), and
//! exits 0 when the file is written and not found invalid.

use dmirror_bench::accel;
use dmirror_bench::compile_fail;
use dmirror_bench::kcidb;
use dmirror_bench::mm;
use dmirror_bench::regress::{self, Verdict};
use dmirror_bench::report;
use dmirror_bench::reuse;
use dmirror_bench::stream;
use dmirror_bench::verdict::{self, Summary};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Guest memory in MiB ([`dmirror_abi::layout`]: the pmem regions and the coherent devices'
/// reserved range are carved out of it).
const GUEST_MEM_MIB: u64 = dmirror_abi::layout::GUEST_MEM_MIB;

/// The same as QEMU's `-m` takes it.
fn guest_mem() -> String {
    format!("{GUEST_MEM_MIB}M")
}
const GUEST_CPUS: u32 = 2;
const QEMU: &str = "qemu-system-x86_64";

struct RunArgs {
    plan: String,
    kernel: PathBuf,
    initrd: PathBuf,
    timeout: u64,
    results: PathBuf,
    accel: accel::Choice,
    append: Vec<String>,
    host_ktap: Vec<PathBuf>,
    smp: u32,
    numa: u32,
    reuse: bool,
}

/// The file in a results directory that names the suites run on the host, one a line; each
/// one's KTAP is `<name>.ktap` beside it.
const HOST_SUITES: &str = "host-suites";

fn usage() -> ExitCode {
    eprintln!(
        "usage: dmirror-bench run --plan P --kernel BZIMAGE --initrd CPIO [--timeout S] [--results DIR] [--accel tcg|kvm|auto] [--smp N] [--numa N] [--append ARG]... [--host-ktap FILE]... [--reuse]\n       dmirror-bench judge RESULTS_DIR\n       dmirror-bench report RESULTS_DIR\n       dmirror-bench regress PATCHED_DIR STOCK_DIR\n       dmirror-bench mm PATCHED_DIR STOCK_DIR --known FILE [--fixed FILE] [--crash-cases FILE --crash DIR...] [--reports-only]\n       dmirror-bench kcidb RESULTS_DIR [--stock STOCK_DIR] [--patches DIR] [--url-base URL]\n       dmirror-bench compile-fail --kdir KDIR --cases DIR --out DIR [--jobs N] [--timeout S] [--make MAKE] [-- MAKE_ARG...]"
    );
    ExitCode::from(2)
}

fn parse_run(args: &[String]) -> Result<RunArgs, String> {
    let mut plan = None;
    let mut kernel = None;
    let mut initrd = None;
    let mut timeout = 2400;
    let mut results = PathBuf::from("results");
    let mut accel = accel::Choice::Tcg;
    let mut append = Vec::new();
    let mut host_ktap = Vec::new();
    let mut smp = GUEST_CPUS;
    let mut numa = 0;
    let mut reuse = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--plan" => plan = Some(value()?),
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initrd" => initrd = Some(PathBuf::from(value()?)),
            "--timeout" => timeout = value()?.parse().map_err(|e| format!("--timeout: {e}"))?,
            "--results" => results = PathBuf::from(value()?),
            "--append" => append.push(value()?),
            "--host-ktap" => host_ktap.push(PathBuf::from(value()?)),
            "--accel" => accel = accel::Choice::parse(&value()?)?,
            // The older spelling of `--accel kvm`.
            "--kvm" => accel = accel::Choice::Kvm,
            "--smp" => smp = value()?.parse().map_err(|e| format!("--smp: {e}"))?,
            "--numa" => numa = value()?.parse().map_err(|e| format!("--numa: {e}"))?,
            "--reuse" => reuse = true,
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(RunArgs {
        plan: plan.ok_or("--plan is required")?,
        kernel: kernel.ok_or("--kernel is required")?,
        initrd: initrd.ok_or("--initrd is required")?,
        timeout,
        results,
        accel,
        append,
        host_ktap,
        smp,
        numa,
        reuse,
    })
    .and_then(|r| {
        for (what, f) in [("--kernel", &r.kernel), ("--initrd", &r.initrd)] {
            if !f.is_file() {
                return Err(format!("{what} {}: no such file", f.display()));
            }
        }
        if r.smp == 0 || r.numa > r.smp || !GUEST_MEM_MIB.is_multiple_of(u64::from(r.numa.max(1))) {
            Err(format!("--smp {} --numa {}: want 1 <= nodes <= CPUs, memory divisible", r.smp, r.numa))
        } else {
            Ok(r)
        }
    })
}

/// The `-smp` value: `cpus` CPUs, each in a socket of its own when there are NUMA nodes.
fn smp_arg(cpus: u32, nodes: u32) -> String {
    if nodes > 0 {
        format!("{cpus},sockets={cpus},cores=1,threads=1")
    } else {
        cpus.to_string()
    }
}

/// The QEMU arguments for `nodes` NUMA nodes sharing the guest's memory and `cpus` CPUs evenly
/// (the first nodes get the CPUs left over).
fn numa_args(nodes: u32, cpus: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut first = 0;
    for n in 0..nodes {
        let k = cpus / nodes + u32::from(n < cpus % nodes);
        out.push("-object".into());
        out.push(format!("memory-backend-ram,id=mem{n},size={}M", GUEST_MEM_MIB / u64::from(nodes)));
        out.push("-numa".into());
        out.push(format!("node,nodeid={n},cpus={first}-{},memdev=mem{n}", first + k - 1));
        first += k;
    }
    out
}

/// Parses the arguments of `compile-fail`; those after `--` go to the kernel's make.
fn parse_compile_fail(args: &[String]) -> Result<compile_fail::Config, String> {
    let mut kdir = None;
    let mut cases = None;
    let mut out = None;
    let mut make = "make".to_string();
    let mut jobs = std::thread::available_parallelism().map_or(1, usize::from);
    let mut timeout = 600;
    let (own, make_args) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], args[i + 1..].to_vec()),
        None => (args, Vec::new()),
    };
    let mut it = own.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--kdir" => kdir = Some(PathBuf::from(value()?)),
            "--cases" => cases = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--make" => make = value()?,
            "--jobs" => jobs = value()?.parse().map_err(|e| format!("--jobs: {e}"))?,
            "--timeout" => timeout = value()?.parse().map_err(|e| format!("--timeout: {e}"))?,
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(compile_fail::Config {
        kdir: kdir.ok_or("--kdir is required")?,
        cases: cases.ok_or("--cases is required")?,
        out: out.ok_or("--out is required")?,
        make,
        make_args,
        jobs,
        timeout: Duration::from_secs(timeout),
    })
}

/// Runs the compile-fail suite and prints one line per case.
fn compile_fail_cmd(cfg: &compile_fail::Config) -> Result<bool, String> {
    let start = Instant::now();
    println!(
        "compile-fail: building the cases of {} against {} ({} at a time)",
        cfg.cases.display(),
        cfg.kdir.display(),
        cfg.jobs
    );
    let results = compile_fail::run(cfg)?;
    let width = results.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for r in &results {
        println!(
            "compile-fail: {:<4} {:<width$}  {} ({:.1} s)",
            if r.ok { "ok" } else { "FAIL" },
            r.name,
            r.note,
            r.secs
        );
    }
    let failed = results.iter().filter(|r| !r.ok).count();
    println!(
        "compile-fail: {} passed, {failed} failed in {:.1} s; KTAP and build logs in {}",
        results.len() - failed,
        start.elapsed().as_secs_f64(),
        cfg.out.display()
    );
    Ok(failed == 0)
}

/// Copies the KTAP files of suites run on the host into a run's directory and lists them in its
/// `host-suites`. A missing file is listed all the same, so that the judge fails its suite.
fn add_host_ktap(dir: &Path, files: &[PathBuf]) -> Result<(), String> {
    let mut names = String::new();
    for file in files {
        let name = file
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .ok_or(format!(
                "--host-ktap {}: no suite name in the file name",
                file.display()
            ))?;
        let to = dir.join(format!("{name}.ktap"));
        match fs::copy(file, &to) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!(
                    "bench: {} is missing: the {name} suite fails",
                    file.display()
                );
            }
            Err(e) => return Err(format!("{} -> {}: {e}", file.display(), to.display())),
        }
        names.push_str(name);
        names.push('\n');
    }
    if !files.is_empty() {
        fs::write(dir.join(HOST_SUITES), names).map_err(|e| format!("{HOST_SUITES}: {e}"))?;
    }
    Ok(())
}

/// UTC `YYYYmmdd-HHMMSS` for a results directory name.
fn timestamp() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d, hh, mm, ss) = kcidb::civil(secs);
    format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}")
}

/// Prints the marker lines that arrived since `pos`, as progress.
fn follow(path: &Path, pos: &mut u64, partial: &mut String, start: Instant) {
    let Ok(mut f) = fs::File::open(path) else { return };
    if f.seek(SeekFrom::Start(*pos)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return;
    }
    *pos += buf.len() as u64;
    partial.push_str(&String::from_utf8_lossy(&buf));
    while let Some(i) = partial.find('\n') {
        let line: String = partial.drain(..=i).collect();
        let line = line.trim_end();
        if let Some(m) = line.find("@@DMIRROR ").map(|i| &line[i + 10..]) {
            let words: Vec<&str> = m.split_whitespace().collect();
            let t = start.elapsed().as_secs_f64();
            match words.as_slice() {
                ["BOOT", rel, ..] => println!("[{t:7.1}s] guest booted {rel}"),
                ["BEGIN", name, ..] => println!("[{t:7.1}s] {name}: running"),
                ["END", name, rc] => println!("[{t:7.1}s] {name}: finished ({rc})"),
                ["DONE"] => println!("[{t:7.1}s] plan done"),
                _ => {}
            }
        }
    }
}

fn run(args: RunArgs) -> Result<bool, String> {
    let mut cmdline = vec![
        "console=ttyS0".to_string(),
        "loglevel=4".into(),
        "panic=-1".into(),
        "no_hash_pointers".into(),
    ];
    cmdline.extend(dmirror_abi::layout::memmap_args());
    cmdline.extend([
        format!("dmirror.plan={}", args.plan),
        // /dev/nullb0 completes each request from a timer interrupt 200 ms after it came.
        "null_blk.irqmode=2".into(),
        "null_blk.completion_nsec=200000000".into(),
    ]);
    cmdline.extend(args.append.iter().cloned());
    // What decides the boot's outcome, for `--reuse`: everything but the timeout.
    let key = reuse::key(
        &[
            cmdline.join(" "),
            format!("smp {} numa {} memory {} accel {:?}", args.smp, args.numa, guest_mem(), args.accel),
            qemu_version().unwrap_or_default(),
            args.host_ktap.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(" "),
        ],
        &[&args.kernel, &args.initrd],
    )?;
    if args.reuse && args.host_ktap.is_empty() {
        let finished = |d: &Path| load(d).is_ok_and(|(_, s)| s.done);
        if let Some(prev) = reuse::find(&args.results, &args.plan, &key, finished) {
            println!(
                "bench: plan {}: reusing {}: same kernel image, initramfs, command line and machine \
                 (RERUN=1 boots again)",
                args.plan,
                prev.display()
            );
            let summary = judge_dir(&prev)?;
            link_latest(&args.results, &args.plan, &prev)?;
            return Ok(summary.ok);
        }
    }
    let dir = args.results.join(format!("{}-{}", timestamp(), args.plan));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    fs::write(dir.join(reuse::KEY_FILE), format!("{key}\n")).map_err(|e| format!("{}: {e}", reuse::KEY_FILE))?;
    add_host_ktap(&dir, &args.host_ktap)?;
    let console = dir.join("console.log");
    let stream_log = dir.join("stream.log");
    let accel_used = accel::resolve(args.accel, QEMU, &args.kernel, &dir);
    let (accel, cpu) = accel_used.qemu_args();
    println!("bench: accelerator {accel}");
    let mut cmd = Command::new(QEMU);
    cmd.args(["-nodefaults", "-no-user-config", "-no-reboot", "-display", "none"])
        .args(["-accel", accel, "-cpu", cpu])
        // With NUMA nodes, one CPU a socket: CPUs of one socket share a last-level cache, and
        // a cache shared across nodes makes the kernel warn at boot.
        .args(["-smp", &smp_arg(args.smp, args.numa), "-m", &guest_mem()])
        .args(if args.numa > 0 { numa_args(args.numa, args.smp) } else { Vec::new() })
        .arg("-kernel")
        .arg(&args.kernel)
        .arg("-initrd")
        .arg(&args.initrd)
        .args(["-append", &cmdline.join(" ")])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", stream_log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    println!("bench: booting {} (plan {}, timeout {} s)", args.kernel.display(), args.plan, args.timeout);
    println!("bench: results in {}", dir.display());
    let start = Instant::now();
    let start_time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut child = cmd.spawn().map_err(|e| format!("{QEMU}: {e}"))?;
    let mut pos = 0;
    let mut partial = String::new();
    let mut timed_out = false;
    let status = loop {
        follow(&stream_log, &mut pos, &mut partial, start);
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > Duration::from_secs(args.timeout) {
            timed_out = true;
            let _ = child.kill();
            break child.wait().map_err(|e| e.to_string())?;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    follow(&stream_log, &mut pos, &mut partial, start);
    let mut qemu_err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut qemu_err);
    }
    let duration = start.elapsed().as_secs_f64();
    println!("bench: guest ran {duration:.1} s");
    if timed_out {
        println!("bench: TIMEOUT after {} s: the guest was killed", args.timeout);
    } else if !status.success() {
        println!("bench: qemu exited with {status}: {}", qemu_err.trim());
    }
    let build_dir = kcidb::build_dir(&args.kernel);
    let record = kcidb::RunRecord {
        plan: args.plan.clone(),
        start_time: kcidb::rfc3339(start_time),
        duration: (duration * 10.0).round() / 10.0,
        timed_out,
        flavour: kcidb::flavour(&args.append, build_dir.as_deref()),
        kernel_image: args.kernel.display().to_string(),
        cmdline: cmdline.join(" "),
        qemu: kcidb::Qemu {
            binary: QEMU.into(),
            version: qemu_version(),
            accel: accel.into(),
            cpu: cpu.into(),
            smp: args.smp,
            memory: guest_mem(),
        },
        kernel: build_dir.as_deref().map(kcidb::kernel_build),
    };
    write_record(&dir, &record, build_dir.as_deref())?;
    let summary = judge_dir(&dir)?;
    println!("bench: the guest ran under {}", if accel == "kvm" { "KVM" } else { "TCG" });
    let reported = if args.plan == "bench" { report_dir(&dir) } else { Ok(()) };
    link_latest(&args.results, &args.plan, &dir)?;
    reported?;
    Ok(summary.ok)
}

/// Points `latest`, and `latest-<plan>` for the runs `make test` pairs up, at a run's directory.
fn link_latest(results: &Path, plan: &str, dir: &Path) -> Result<(), String> {
    for link in ["latest".to_string(), format!("latest-{plan}")] {
        let latest = results.join(link);
        let _ = fs::remove_file(&latest);
        if let Some(name) = dir.file_name() {
            std::os::unix::fs::symlink(name, &latest).map_err(|e| format!("{}: {e}", latest.display()))?;
        }
    }
    Ok(())
}

/// The emulator's version line, if it says one.
fn qemu_version() -> Option<String> {
    let out = Command::new(QEMU).arg("--version").stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string()).filter(|l| !l.is_empty())
}

/// Writes a run's `run.json` and copies its kernel's configuration beside it.
fn write_record(dir: &Path, record: &kcidb::RunRecord, build_dir: Option<&Path>) -> Result<(), String> {
    let json = serde_json::to_string_pretty(record).map_err(|e| e.to_string())?;
    fs::write(dir.join(kcidb::RECORD), json).map_err(|e| format!("{}: {e}", kcidb::RECORD))?;
    if let Some(b) = build_dir {
        if let Err(e) = fs::copy(b.join(".config"), dir.join(kcidb::CONFIG)) {
            println!("bench: {}/.config not copied: {e}", b.display());
        }
    }
    Ok(())
}

/// Writes a patched run's results, and its stock run's, as KCIDB data (`kcidb.json`), and
/// validates the file with `kcidb-io` where it is installed.
fn kcidb_cmd(args: &[String]) -> Result<bool, String> {
    let mut dir = None;
    let mut stock = None;
    let mut patches = None;
    let mut options = kcidb::Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--stock" => stock = Some(PathBuf::from(value()?)),
            "--patches" => patches = Some(PathBuf::from(value()?)),
            "--url-base" => options.url_base = Some(value()?),
            s if !s.starts_with("--") && dir.is_none() => dir = Some(PathBuf::from(s)),
            _ => return Err(format!("kcidb: unknown argument {a}")),
        }
    }
    let dir = dir.ok_or("kcidb: RESULTS_DIR is required")?;
    // The runs' own directories, not the `latest-*` links: their names are the IDs.
    let dir = fs::canonicalize(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let stock = match stock {
        Some(s) => match fs::canonicalize(&s) {
            Ok(s) if matches!((stamp(&s), stamp(&dir)), (Some(a), Some(b)) if a < b) => {
                println!("kcidb: {} is older than {}: not its stock run, left out", s.display(), dir.display());
                None
            }
            Ok(s) => Some(s),
            Err(e) => {
                println!("kcidb: no stock run ({}: {e}), left out", s.display());
                None
            }
        },
        None => None,
    };
    let series = patches.as_deref().map(kcidb::Series::read).transpose()?;
    let (patched_stream, patched_summary) = load(&dir)?;
    let stock_loaded = stock.as_deref().map(load).transpose()?;
    let patched = kcidb_run(&dir, &patched_stream, &patched_summary)?;
    let stock_run = match (&stock, &stock_loaded) {
        (Some(d), Some((st, su))) => Some(kcidb_run(d, st, su)?),
        _ => None,
    };
    let data = kcidb::export(&patched, stock_run.as_ref(), series.as_ref(), &options);
    let file = dir.join(kcidb::FILE);
    let json = serde_json::to_string_pretty(&data).map_err(|e| e.to_string())?;
    fs::write(&file, json + "\n").map_err(|e| format!("{}: {e}", file.display()))?;
    println!("kcidb: wrote {}: {}", file.display(), kcidb::counts(&data));
    match kcidb::validator() {
        Err(why) => {
            println!("kcidb: SKIP validation: {why}");
            Ok(true)
        }
        Ok(python) => match kcidb::validate(&python, &file) {
            Ok(verdict) => {
                println!("kcidb: {verdict}");
                Ok(true)
            }
            Err(why) => {
                println!("kcidb: FAIL: {} is not valid KCIDB data: {why}", file.display());
                Ok(false)
            }
        },
    }
}

/// A judged run as the KCIDB export reads it.
fn kcidb_run<'a>(dir: &Path, stream: &stream::Stream, summary: &'a Summary) -> Result<kcidb::Run<'a>, String> {
    let record = match fs::read_to_string(dir.join(kcidb::RECORD)) {
        Ok(text) => Some(
            serde_json::from_str(&text).map_err(|e| format!("{}/{}: {e}", dir.display(), kcidb::RECORD))?,
        ),
        Err(_) => None,
    };
    Ok(kcidb::Run {
        name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        summary,
        boot_dmesg: stream
            .suites
            .iter()
            .find(|s| s.name == "boot")
            .map(|s| s.dmesg.clone())
            .unwrap_or_default(),
        record,
        has_config: dir.join(kcidb::CONFIG).is_file(),
        outputs: stream
            .suites
            .iter()
            .map(|s| (s.name.clone(), s.output.clone()))
            .chain(summary.suites.iter().filter(|s| s.host).map(|s| {
                let ktap = fs::read_to_string(dir.join(format!("{}.ktap", s.name))).unwrap_or_default();
                (s.name.clone(), ktap)
            }))
            .collect(),
    })
}

/// The `YYYYmmdd-HHMMSS` stamp a results directory's name starts with, if it has one.
fn stamp(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_str()?;
    let s = name.get(..15)?;
    let ok = s.char_indices().all(|(i, c)| if i == 8 { c == '-' } else { c.is_ascii_digit() });
    ok.then(|| s.to_string())
}

/// Writes and prints the benchmark report of a run.
fn report_dir(dir: &Path) -> Result<(), String> {
    let md = report::write(dir)?;
    println!("\n{md}");
    println!("bench: report in {}", dir.join("bench").display());
    Ok(())
}

/// Parses and judges a results directory's saved guest output, with the suites run on the host.
fn load(dir: &Path) -> Result<(stream::Stream, Summary), String> {
    let read = |name: &str| fs::read(dir.join(name)).map(|b| String::from_utf8_lossy(&b).into_owned());
    let console = read("console.log").unwrap_or_default();
    let stream_text = read("stream.log").map_err(|e| format!("{}/stream.log: {e}", dir.display()))?;
    let stream = stream::parse(&stream_text);
    let mut summary = verdict::judge(&stream, &console);
    // The suites run on the host before the guest, from their saved KTAP.
    for name in read(HOST_SUITES)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        summary.add_host_suite(name, read(&format!("{name}.ktap")).ok().as_deref());
    }
    Ok((stream, summary))
}

/// Puts the regression suite of a stock run beside a patched run's; prints the table and the
/// patched run's gated totals with one test per regression row; writes `regress.md`.
fn regress_dirs(patched_dir: &Path, stock_dir: &Path) -> Result<bool, String> {
    // The runs' own directories, not the `latest-*` links, in the report.
    let patched_dir = &fs::canonicalize(patched_dir).map_err(|e| format!("{}: {e}", patched_dir.display()))?;
    let stock_dir = &fs::canonicalize(stock_dir).map_err(|e| format!("{}: {e}", stock_dir.display()))?;
    let (_, patched) = load(patched_dir)?;
    let (_, stock) = load(stock_dir)?;
    let rows = regress::compare(&patched, &stock);
    let md = format!(
        "Regression suite `{}`: stock kernel ({}, {}) beside patched ({}, {}).\n\n{}",
        regress::SUITE,
        stock.kernel.as_deref().unwrap_or("?"),
        stock_dir.display(),
        patched.kernel.as_deref().unwrap_or("?"),
        patched_dir.display(),
        regress::table(&rows)
    );
    fs::write(patched_dir.join("regress.md"), &md).map_err(|e| format!("regress.md: {e}"))?;
    println!("\n{md}");
    let count = |v: Verdict| rows.iter().filter(|r| r.verdict == v).count();
    let (fixed, skipped, wrong) = (count(Verdict::Fixed), count(Verdict::Skip), count(Verdict::Wrong));
    if rows.is_empty() {
        println!("bench: no regression test in either run");
    }
    if !stock.done {
        println!("bench: the stock run did not finish its plan");
    }
    let ok = patched.ok && stock.done && wrong == 0 && !rows.is_empty();
    println!("bench: patched run {}, regression {fixed} fixed, {wrong} wrong, {skipped} skipped", if patched.ok { "PASS" } else { "FAIL" });
    // Again here, at the end of `make test`, where a log cut to its tail still shows them.
    for (suite, t) in patched.gated_failures() {
        println!("bench: patched run failed: {suite}: {} {} (see {}/{suite}.ktap)", t.name, t.note, patched_dir.display());
    }
    if !patched.done {
        println!("bench: the patched run did not finish its plan");
    }
    println!("bench: {}", if ok { "PASS" } else { "FAIL" });
    println!(
        "{} passed, {} failed, {} skipped",
        patched.gated.passed + fixed,
        patched.gated.failed + wrong + usize::from(!stock.done || rows.is_empty()),
        patched.gated.skipped + skipped
    );
    Ok(ok)
}

/// Puts the mm selftests of a stock run beside a patched run's: writes `mm-selftests.md` and
/// `mm-selftests.json` into the patched run's directory, prints what needs a reader's eye and
/// the one-line summary.
/// With `reports_only` (a patched kernel of another configuration than the stock one, as the
/// debug flavour's), the comparison is written and printed but only the patched run's kernel
/// reports and completion are judged.
struct MmArgs {
    patched: PathBuf,
    stock: PathBuf,
    known: PathBuf,
    fixed: Option<PathBuf>,
    /// The cases that take the stock kernel down and the stock boots that ran them, one each, in
    /// order (`--crash-cases FILE --crash DIR...`).
    crash: Option<(PathBuf, Vec<PathBuf>)>,
    reports_only: bool,
}

fn parse_mm(args: &[String]) -> Result<MmArgs, String> {
    let (mut known, mut fixed, mut reports_only) = (None, None, false);
    let (mut crash, mut crash_cases) = (Vec::new(), None);
    let mut it = args[2..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--known" => known = it.next().map(PathBuf::from),
            "--fixed" => fixed = Some(it.next().map(PathBuf::from).ok_or("mm: --fixed wants a file")?),
            "--crash" => crash.push(it.next().map(PathBuf::from).ok_or("mm: --crash wants a directory")?),
            "--crash-cases" => crash_cases = Some(it.next().map(PathBuf::from).ok_or("mm: --crash-cases wants a file")?),
            "--reports-only" => reports_only = true,
            _ => return Err(format!("mm: unknown argument {a}")),
        }
    }
    Ok(MmArgs {
        patched: PathBuf::from(&args[0]),
        stock: PathBuf::from(&args[1]),
        known: known.ok_or("mm: --known FILE is required")?,
        fixed,
        crash: match (crash_cases, crash.is_empty()) {
            (Some(f), false) => Some((f, crash)),
            (None, true) => None,
            _ => return Err("mm: --crash-cases FILE and --crash DIR go together".into()),
        },
        reports_only,
    })
}

/// Reads a rules file of `dmirror-bench mm` (`--known`, `--fixed`).
fn mm_rules(file: &Path) -> Result<Vec<mm::Known>, String> {
    let text = fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    mm::parse_known(&text).map_err(|e| format!("{}: {e}", file.display()))
}

fn mm_dirs(args: &MmArgs) -> Result<bool, String> {
    let patched_dir = &fs::canonicalize(&args.patched).map_err(|e| format!("{}: {e}", args.patched.display()))?;
    let stock_dir = &fs::canonicalize(&args.stock).map_err(|e| format!("{}: {e}", args.stock.display()))?;
    let known = mm_rules(&args.known)?;
    let fixed = args.fixed.as_deref().map(mm_rules).transpose()?.unwrap_or_default();
    let (_, patched) = load(patched_dir)?;
    let (_, stock) = load(stock_dir)?;
    let (mut crashed, mut unproven) = (Vec::new(), Vec::new());
    if let Some((cases, dirs)) = &args.crash {
        let rules = mm_rules(cases)?;
        if rules.len() != dirs.len() {
            return Err(format!("mm: {} crash cases in {}, {} --crash boots", rules.len(), cases.display(), dirs.len()));
        }
        for (rule, dir) in rules.iter().zip(dirs) {
            let (stream, crash) = load(dir)?;
            let output = stream.suites.iter().find(|s| s.name == mm::SUITE).map_or("", |s| s.output.as_str());
            match mm::crash_case(rule, &crash, output) {
                Ok(c) => crashed.push(c),
                Err(e) => unproven.push(e),
            }
        }
    }
    let rows = mm::compare(&patched, &stock, &crashed, &known);
    unproven.extend(mm::unproven(&rows, &fixed));
    let counts = mm::counts(&rows);
    let findings = mm::findings(&patched);
    let line = mm::summary_line(&counts);
    let md = format!(
        "The kernel's mm selftests (suite `{}`): stock kernel ({}, {}) beside patched ({}, {}).\n\n{line}\n\n{}",
        mm::SUITE,
        stock.kernel.as_deref().unwrap_or("?"),
        stock_dir.display(),
        patched.kernel.as_deref().unwrap_or("?"),
        patched_dir.display(),
        mm::table(&rows)
    );
    fs::write(patched_dir.join("mm-selftests.md"), &md).map_err(|e| format!("mm-selftests.md: {e}"))?;
    let json = serde_json::json!({
        "suite": mm::SUITE,
        "patched": { "dir": patched_dir, "kernel": patched.kernel },
        "stock": { "dir": stock_dir, "kernel": stock.kernel },
        "counts": counts,
        "patched_findings": findings,
        "rows": rows,
    });
    let json = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    fs::write(patched_dir.join("mm-selftests.json"), json).map_err(|e| format!("mm-selftests.json: {e}"))?;
    println!("\nmm-selftests: the table (stock beside patched, per case) is in {}", patched_dir.join("mm-selftests.md").display());
    for n in mm::notable(&rows) {
        println!("mm-selftests: {n}");
    }
    for u in &unproven {
        println!("mm-selftests: {u}");
    }
    for f in &findings {
        println!("mm-selftests: patched kernel report {} at dmesg line {}: {}", f.kind, f.line_no, f.line);
    }
    for (what, s) in [("patched", &patched), ("stock", &stock)] {
        if !s.done {
            println!("mm-selftests: the {what} run did not finish its plan");
        }
    }
    let ok = if args.reports_only {
        println!(
            "mm-selftests: the patched kernel's configuration is not the stock kernel's: the \
             differences above are shown, not judged; judged are the patched run's kernel reports \
             and that it finished"
        );
        findings.is_empty() && patched.done && counts.cases > 0
    } else {
        mm::ok(&counts, &unproven, &findings, patched.done && stock.done)
    };
    println!("{line}");
    println!("mm-selftests: {}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}

/// Judges a results directory and writes its per-suite files and summary.
fn judge_dir(dir: &Path) -> Result<Summary, String> {
    let (stream, summary) = load(dir)?;
    let write = |name: &str, text: &str| fs::write(dir.join(name), text).map_err(|e| format!("{name}: {e}"));
    let mut dmesg_all = String::new();
    for s in &stream.suites {
        dmesg_all.push_str(&format!("==== {} ====\n{}", s.name, s.dmesg));
        if s.name != "boot" {
            write(&format!("{}.ktap", s.name), &s.output)?;
        }
    }
    write("dmesg.txt", &dmesg_all)?;
    let json = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
    write("summary.json", &json)?;
    print_summary(&summary);
    Ok(summary)
}

fn print_summary(summary: &Summary) {
    println!();
    println!("{:<24} {:>6} {:>7} {:>7} {:>8} {:>9}", "suite", "gated", "passed", "failed", "skipped", "findings");
    for s in &summary.suites {
        println!(
            "{:<24} {:>6} {:>7} {:>7} {:>8} {:>9}",
            s.name,
            if s.gated { "yes" } else { "no" },
            s.passed,
            s.failed,
            s.skipped,
            s.findings.len()
        );
    }
    for s in &summary.suites {
        let failed: Vec<_> = s.failures().collect();
        if !failed.is_empty() && s.gated {
            println!("\n{}: failed", s.name);
            for t in failed.iter().take(40) {
                println!("  {} {}", t.name, t.note);
            }
        } else if !failed.is_empty() {
            // Not gated: what it shows is the reference's or the stock kernel's, judged elsewhere.
            let names: Vec<&str> = failed.iter().take(4).map(|t| t.name.as_str()).collect();
            let more = if failed.len() > names.len() { ", ..." } else { "" };
            println!("{} (not gated): {} failed: {}{more}", s.name, failed.len(), names.join(", "));
        }
        if s.findings.is_empty() {
            continue;
        }
        if s.gated && !s.expect_findings {
            println!("\n{}: {} kernel report(s)", s.name, s.findings.len());
            for f in s.findings.iter().take(20) {
                println!("  --- {} at dmesg line {}", f.kind, f.line_no);
                for l in &f.context {
                    println!("  | {l}");
                }
            }
            if s.findings.len() > 20 {
                println!("  ... {} more in dmesg.txt / summary.json", s.findings.len() - 20);
            }
        } else {
            // Expected (the bench's self-check) or not gated: one line, the details in dmesg.txt
            // and summary.json.
            let f = &s.findings[0];
            println!(
                "{} ({}): {} kernel report(s), the first {} at dmesg line {}: {}",
                s.name,
                if s.expect_findings { "expected: bench self-check" } else { "not gated" },
                s.findings.len(),
                f.kind,
                f.line_no,
                f.line.trim()
            );
        }
    }
    println!();
    // A plan that gates nothing (the stock kernel's, the mm selftests', the reference's) is judged
    // with another run, or not at all: a clean boot gives no verdict of its own.
    if summary.ok && !summary.suites.iter().any(|s| s.gated && s.name != "boot") {
        let (p, f, k) = summary.suites.iter().filter(|s| !s.gated).fold((0, 0, 0), |(p, f, k), s| {
            (p + s.passed, f + s.failed, k + s.skipped)
        });
        println!("bench: no gated suite in this plan: {p} passed, {f} failed, {k} skipped, no verdict of its own");
    } else {
        println!("bench: {}", if summary.ok { "PASS" } else { "FAIL" });
        println!("{} passed, {} failed, {} skipped", summary.gated.passed, summary.gated.failed, summary.gated.skipped);
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => match parse_run(&args[1..]) {
            Ok(a) => run(a),
            Err(e) => {
                eprintln!("dmirror-bench: {e}");
                return usage();
            }
        },
        Some("judge") if args.len() == 2 => judge_dir(Path::new(&args[1])).map(|s| s.ok),
        Some("report") if args.len() == 2 => report_dir(Path::new(&args[1])).map(|()| true),
        Some("regress") if args.len() == 3 => regress_dirs(Path::new(&args[1]), Path::new(&args[2])),
        Some("kcidb") if args.len() >= 2 => kcidb_cmd(&args[1..]),
        Some("mm") if args.len() >= 3 => match parse_mm(&args[1..]) {
            Ok(cfg) => mm_dirs(&cfg),
            Err(e) => {
                eprintln!("dmirror-bench: {e}");
                return usage();
            }
        },
        Some("compile-fail") => match parse_compile_fail(&args[1..]) {
            Ok(cfg) => compile_fail_cmd(&cfg),
            Err(e) => {
                eprintln!("dmirror-bench: {e}");
                return usage();
            }
        },
        _ => return usage(),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("dmirror-bench: {e}");
            ExitCode::from(2)
        }
    }
}
