//! dmirror-perf: the benchmark's guest side.
//!
//! Runs the same workloads against the C `test_hmm.ko` and `dmirror.ko` in one boot, loading
//! one module at a time (both create `/dev/hmm_dmirror0`), in alternating order, and prints
//! every timed sample as a KTAP comment the host turns into the report:
//!
//! ```text
//! # bench,<driver>,<workload>,<kind>,<bytes>,<rep>,<ns>
//! ```
//!
//! A turn is: load the module (timed), warm its device memory up, then for each page kind and
//! buffer size: MIGRATE_TO_DEV, MIGRATE_TO_SYS, CPU faults back in sequential and random
//! order, READ and WRITE on system memory (each timed, each checked; sizes below 32 MiB run
//! several times a turn, 32 MiB / size times and at most 8, each run a sample), then migrate the
//! largest buffer to the device, close and unload (timed: the driver evicts it) and check the
//! evicted data. A KTAP result per turn says whether every operation did what it should.
//!
//! Each recorded turn also measures, per driver: the latency of every CPU fault of its
//! `fault_seq` and `fault_rand` runs ([`lat`]), the kernel memory a resident and a mirrored
//! buffer cost at two sizes ([`kmem`]), and MIGRATE_TO_DEV, MIGRATE_TO_SYS and faults by one
//! and by two threads ([`conc`]).
//!
//! `dmirror-perf [--reps N] [--warmup N] [--sizes MIB,...] [--seed N] [--rust KO] [--c KO]
//! [--profile WORKLOAD:KIND] [--rows NAME,...] [--kmem MIB,MIB] [--conc MIB]`
//!
//! `--profile` runs ftrace's function profiler around the timed operations of that workload
//! and prints the kernel functions that took the most time (inclusive, per driver and size).
//! Neither module's own functions are traceable (lib/ builds without ftrace hooks, Rust code
//! has none), so the profile shows the core mm functions each driver's code spends time in.

mod conc;
mod kmem;
mod lat;

use dmirror_abi::ktap::Ktap;
use dmirror_abi::uapi::{MIGRATE_TO_DEV, MIGRATE_TO_SYS, PAGE, PROT_DEV_MASK, READ, WRITE};
use dmirror_suite::hmm::{Dev, Map, Rng, THP};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::Stdout;
use std::os::fd::AsRawFd;
use std::time::Instant;

const MIB: usize = 1 << 20;
const DEVICE: &str = "/dev/hmm_dmirror0";

#[derive(Clone, Copy, PartialEq)]
enum Driver {
    C,
    Rust,
}

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::C => "c",
            Driver::Rust => "rust",
        }
    }

    fn module(self) -> &'static str {
        match self {
            Driver::C => "test_hmm",
            Driver::Rust => "dmirror",
        }
    }
}

/// The page size of a buffer: 4 KiB pages (`MADV_NOHUGEPAGE`) or THP (`MADV_HUGEPAGE`).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Small,
    Huge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Small => "4k",
            Kind::Huge => "thp",
        }
    }
}

struct Opts {
    reps: usize,
    warmup: usize,
    sizes: Vec<usize>,
    seed: u64,
    ko_rust: String,
    /// Module parameters of `dmirror.ko` (`--rust-args`), space-separated.
    rust_args: String,
    ko_c: String,
    profile: Vec<(String, String)>,
    rows: Vec<String>,
    kmem: Vec<usize>,
    conc: usize,
}

/// The row groups `--rows` selects from: the throughput workloads (`fault_seq` and
/// `fault_rand` also give the latency rows), kernel memory and concurrency.
const ROWS: &[&str] = &["to_dev", "to_sys", "fault_seq", "fault_rand", "read", "write", "kmem", "conc"];

fn usage() -> ! {
    eprintln!(
        "usage: dmirror-perf [--reps N] [--warmup N] [--sizes MIB,...] [--seed N] [--rust KO] [--c KO]\n\
         \n\
         --reps N       recorded turns per driver (default 5)\n\
         --warmup N     unrecorded turns per driver first, at the two smallest sizes (default 1)\n\
         --sizes LIST   buffer sizes in MiB, multiples of 2 (default 2,8,32,128,256)\n\
         --seed N       seed of the data and the random fault order (default: the clock)\n\
         --rust-args P  dmirror.ko's module parameters, comma-separated (fault_around=1,...)\n\
         --profile W:K  function profile of workload W (to_dev, ..., conc_to_dev_2t2f) at kind K\n\
         \x20              (4k, thp); repeatable\n\
         --rows LIST    row groups to run, of to_dev,to_sys,fault_seq,fault_rand,read,write,kmem,conc\n\
         \x20              (default all; fault_seq and fault_rand give the latency rows)\n\
         --kmem A,B     the two sizes in MiB of the kernel memory rows (default 64,256)\n\
         --conc MIB     MiB a thread of the concurrency rows (default 8)"
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut o = Opts {
        reps: 5,
        warmup: 1,
        sizes: vec![2, 8, 32, 128, 256],
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        ko_rust: "/lib/modules/dmirror.ko".into(),
        rust_args: String::new(),
        ko_c: "/lib/modules/test_hmm.ko".into(),
        profile: Vec::new(),
        rows: ROWS.iter().map(|r| r.to_string()).collect(),
        kmem: vec![64, 256],
        conc: 8,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| usage());
        let num = |v: String| v.parse::<u64>().unwrap_or_else(|_| usage());
        match a.as_str() {
            "--reps" => o.reps = num(value()) as usize,
            "--warmup" => o.warmup = num(value()) as usize,
            "--seed" => o.seed = num(value()),
            "--rust" => o.ko_rust = value(),
            "--rust-args" => o.rust_args = value().replace(',', " "),
            "--c" => o.ko_c = value(),
            "--profile" => {
                let v = value();
                let (w, k) = v.split_once(':').unwrap_or_else(|| usage());
                o.profile.push((w.to_string(), k.to_string()));
            }
            "--rows" => o.rows = value().split(',').map(str::to_string).collect(),
            "--kmem" => {
                o.kmem = value()
                    .split(',')
                    .map(|s| num(s.to_string()) as usize)
                    .collect();
            }
            "--conc" => o.conc = num(value()) as usize,
            "--sizes" => {
                o.sizes = value()
                    .split(',')
                    .map(|s| num(s.to_string()) as usize)
                    .collect();
            }
            _ => usage(),
        }
    }
    o.sizes.sort_unstable();
    let largest = o.sizes.last().copied().unwrap_or(0);
    if o.reps == 0
        || o.sizes.is_empty()
        || o.sizes.iter().any(|&s| s == 0 || s % 2 != 0)
        || o.rows.iter().any(|r| !ROWS.contains(&r.as_str()))
        || o.kmem.len() != 2
        || o.kmem[0] >= o.kmem[1]
        || o.kmem[1] > largest
        || o.conc == 0
        || 2 * o.conc > largest
    {
        usage();
    }
    o
}

type Res<T = ()> = Result<T, String>;

pub(crate) fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Loads a module with `finit_module` and its parameters `params` (space-separated), and
/// returns how long the call took.
fn load(path: &str, params: &str) -> Res<u64> {
    let f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let params = CString::new(params).map_err(|e| format!("{path} parameters: {e}"))?;
    let t = Instant::now();
    // Both outlive the call.
    // SAFETY: `f` is an open module file and `params` a NUL-terminated string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    let ns = t.elapsed().as_nanos() as u64;
    if r != 0 {
        return Err(os_err(&format!("finit_module {path}")));
    }
    Ok(ns)
}

/// Unloads a module with `delete_module` and returns how long the call took.
fn unload(name: &str) -> Res<u64> {
    let c = CString::new(name).map_err(|e| e.to_string())?;
    let t = Instant::now();
    // SAFETY: `c` is a NUL-terminated module name that outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_delete_module, c.as_ptr(), libc::O_NONBLOCK) };
    let ns = t.elapsed().as_nanos() as u64;
    if r != 0 {
        return Err(os_err(&format!("delete_module {name}")));
    }
    Ok(ns)
}

fn loaded(name: &str) -> bool {
    std::fs::read_to_string("/proc/modules")
        .map(|m| m.lines().any(|l| l.split(' ').next() == Some(name)))
        .unwrap_or(false)
}

/// The buffers every turn of both drivers uses: one per page kind and a mirror buffer for
/// READ, WRITE and the MIGRATE_TO_DEV readback, each as large as the largest size.
struct Buffers {
    small: Map,
    huge: Map,
    mirror: Map,
}

impl Buffers {
    /// The buffers of both kinds are aligned to 2 MiB, as the kernel aligns a plain anonymous
    /// `mmap()` of a multiple of 2 MiB, so both drivers see the page tables programs hand
    /// over. The mirror buffer is not: copies between two buffers at the same offset modulo
    /// a large power of two run several times slower under TCG (its software TLB aliases
    /// them; `memcpy` between two 2 MiB-aligned buffers measured 6 times slower).
    fn new(len: usize) -> Res<Buffers> {
        let map = |huge: bool, aligned: bool| -> Res<Map> {
            let m = if aligned { Map::thp(len) } else { Map::anon(len) }
                .map_err(|e| format!("mmap: {e:?}"))?;
            if !huge {
                // SAFETY: Advice on our own mapping.
                unsafe { libc::madvise(m.addr as *mut _, len, libc::MADV_NOHUGEPAGE) };
            }
            m.bytes().fill(1);
            Ok(m)
        };
        Ok(Buffers {
            small: map(false, true)?,
            huge: map(true, true)?,
            mirror: map(false, false)?,
        })
    }

    fn of(&self, kind: Kind) -> &Map {
        match kind {
            Kind::Small => &self.small,
            Kind::Huge => &self.huge,
        }
    }
}

/// Gives `[addr, addr + len)` fresh pages of its kind (THP where advised) and writes a marker
/// word to each page: `stamp + page index`.
pub(crate) fn populate(m: &Map, len: usize, stamp: u64) -> Res {
    // Every workload ends with its buffer in system memory.
    // SAFETY: Drops the pages of our own mapping, which are in system memory.
    if unsafe { libc::madvise(m.addr as *mut _, len, libc::MADV_DONTNEED) } != 0 {
        return Err(os_err("madvise(MADV_DONTNEED)"));
    }
    mark(m.addr, len, stamp);
    Ok(())
}

fn mark(addr: usize, len: usize, stamp: u64) {
    for i in 0..len / PAGE {
        // SAFETY: `addr + i * PAGE` is a page of one of our read-write mappings.
        unsafe { std::ptr::write_volatile((addr + i * PAGE) as *mut u64, stamp + i as u64) };
    }
}

/// Reads the marker word of each page in `order` (faulting device pages back); returns how
/// many differ.
pub(crate) fn touch(addr: usize, order: impl Iterator<Item = usize>, stamp: u64) -> usize {
    let mut bad = 0;
    for i in order {
        // SAFETY: `addr + i * PAGE` is a page of one of our read-write mappings.
        let v = unsafe { std::ptr::read_volatile((addr + i * PAGE) as *const u64) };
        bad += usize::from(v != stamp + i as u64);
    }
    bad
}

pub(crate) fn check(addr: usize, len: usize, stamp: u64, what: &str) -> Res {
    match touch(addr, 0..len / PAGE, stamp) {
        0 => Ok(()),
        n => Err(format!("{what}: {n} of {} pages hold the wrong data", len / PAGE)),
    }
}

/// Checks with SNAPSHOT that `npages` pages from `addr` are all in the device's memory
/// (`device`) or none of them is (the drivers count `cpages` of MIGRATE_TO_SYS differently).
pub(crate) fn placed(dev: &Dev, addr: usize, npages: usize, device: bool, what: &str) -> Res {
    let snap = dev.snapshot(addr, npages).map_err(|e| format!("{what}: SNAPSHOT: {e}"))?;
    let on = snap.iter().filter(|&&p| p & PROT_DEV_MASK != 0).count();
    let want = if device { npages } else { 0 };
    if on != want {
        return Err(format!("{what}: {on} of {npages} pages are in device memory, not {want}"));
    }
    Ok(())
}

/// One timed ioctl; checks `cpages` when `want` is given.
pub(crate) fn ioctl(dev: &Dev, req: u64, addr: usize, ptr: usize, npages: usize, want: Option<usize>, what: &str) -> Res<u64> {
    let t = Instant::now();
    let c = dev
        .cmd(req, addr, ptr, npages)
        .map_err(|e| format!("{what}: {e}"))?;
    let ns = t.elapsed().as_nanos() as u64;
    if let Some(w) = want {
        if c.cpages != w as u64 {
            return Err(format!("{what}: moved {} of {w} pages", c.cpages));
        }
    }
    Ok(ns)
}

struct Turn<'a> {
    driver: Driver,
    /// `None` for warm-up turns, which print no samples.
    rep: Option<usize>,
    bufs: &'a Buffers,
    rng: Rng,
    profile: &'a [(String, String)],
    opts: &'a Opts,
    /// This turn's fault latencies in ns, by workload and kind.
    lat: BTreeMap<(&'static str, &'static str), Vec<u32>>,
    /// Kernel memory before the module was loaded.
    before_load: Option<kmem::Snap>,
}

impl Turn<'_> {
    fn sample(&self, workload: &str, kind: &str, bytes: usize, ns: u64) {
        if let Some(rep) = self.rep {
            println!("# bench,{},{workload},{kind},{bytes},{rep},{ns}", self.driver.name());
        }
    }

    /// Starts the function profiler if `workload` at `kind` is the one to profile.
    pub(crate) fn profile_start(&self, workload: &str, kind: &str) -> bool {
        let on = self.rep.is_some() && self.profile.iter().any(|(w, k)| w == workload && k == kind);
        // Writing 1 resets the counters.
        on && profiler(true).map_err(|e| println!("# profile: {e}")).is_ok()
    }

    pub(crate) fn profile_end(&self, on: bool, workload: &str, kind: &str, bytes: usize) {
        if !on {
            return;
        }
        let _ = profiler(false);
        let at = format!("{} {workload} {kind} {} MiB", self.driver.name(), bytes / MIB);
        match profile_top(60) {
            Ok(top) => {
                for (f, hits, us) in top {
                    println!("# profile {at}: {f:<40} {hits:>9} hits {us:>12.1} us");
                }
            }
            Err(e) => println!("# profile {at}: {e}"),
        }
    }

    /// Runs one timed ioctl workload of `len` bytes at `kind` (`op` returns its time in ns),
    /// under the function profiler if it is the one asked for, and records the sample if its
    /// rows are on.
    fn timed(&self, workload: &str, kind: &str, len: usize, op: impl FnOnce() -> Res<u64>) -> Res {
        let p = self.profile_start(workload, kind);
        let ns = op()?;
        self.profile_end(p, workload, kind, len);
        if self.on(workload) {
            self.sample(workload, kind, len, ns);
        }
        Ok(())
    }

    fn on(&self, rows: &str) -> bool {
        self.opts.rows.iter().any(|r| r == rows)
    }

    fn stamp(&mut self) -> u64 {
        self.rng.next() >> 24
    }

    /// Every workload on `len` bytes of the buffer of `kind`.
    fn workloads(&mut self, dev: &Dev, kind: Kind, len: usize) -> Res {
        let buf = self.bufs.of(kind);
        let mirror = self.bufs.mirror.addr;
        let n = len / PAGE;
        let k = kind.name();
        let driver = self.driver.name();
        let at = |w: &str| format!("{driver} {w} {k} {} MiB", len / MIB);

        // MIGRATE_TO_DEV, with the readback of the migrated data into the mirror.
        if self.on("to_dev") || self.on("to_sys") {
            self.migrations(dev, kind, len)?;
        }
        // CPU faults bring the pages back (migrate_to_ram), in page order and in random order.
        for random in [false, true] {
            let w = if random { "fault_rand" } else { "fault_seq" };
            if !self.on(w) {
                continue;
            }
            let s = self.stamp();
            populate(buf, len, s)?;
            ioctl(dev, MIGRATE_TO_DEV, buf.addr, mirror, n, Some(n), &at(w))?;
            let mut order: Vec<usize> = (0..n).collect();
            if random {
                for i in (1..n).rev() {
                    order.swap(i, self.rng.below(i as u64 + 1) as usize);
                }
            }
            let mut lat = Vec::new();
            let p = self.profile_start(w, k);
            let t = Instant::now();
            let bad = lat::touch_timed(buf.addr, &order, s, kind == Kind::Huge, &mut lat).map_err(|e| format!("{}: {e}", at(w)))?;
            let ns = t.elapsed().as_nanos() as u64;
            self.profile_end(p, w, k, len);
            if bad != 0 {
                return Err(format!("{}: {bad} of {n} pages came back wrong", at(w)));
            }
            self.sample(w, k, len, ns);
            if self.rep.is_some() {
                self.lat.entry((w, k)).or_default().extend_from_slice(&lat);
            }
        }

        // READ and WRITE through the mirror on system memory.
        if self.on("read") || self.on("write") {
            self.read_write(dev, kind, len)?;
        }
        Ok(())
    }

    /// MIGRATE_TO_DEV and MIGRATE_TO_SYS of `len` bytes of the buffer of `kind`.
    fn migrations(&mut self, dev: &Dev, kind: Kind, len: usize) -> Res {
        let buf = self.bufs.of(kind);
        let mirror = self.bufs.mirror.addr;
        let n = len / PAGE;
        let k = kind.name();
        let driver = self.driver.name();
        let at = |w: &str| format!("{driver} {w} {k} {} MiB", len / MIB);
        let s = self.stamp();
        populate(buf, len, s)?;
        self.timed("to_dev", k, len, || {
            ioctl(dev, MIGRATE_TO_DEV, buf.addr, mirror, n, Some(n), &at("to_dev"))
        })?;
        check(mirror, len, s, &at("to_dev readback"))?;
        placed(dev, buf.addr, n, true, &at("to_dev"))?;

        // MIGRATE_TO_SYS of what is now on the device.
        self.timed("to_sys", k, len, || ioctl(dev, MIGRATE_TO_SYS, buf.addr, 0, n, None, &at("to_sys")))?;
        placed(dev, buf.addr, n, false, &at("to_sys"))?;
        check(buf.addr, len, s, &at("to_sys"))
    }

    /// READ and WRITE of `len` bytes of the buffer of `kind` through the mirror.
    fn read_write(&mut self, dev: &Dev, kind: Kind, len: usize) -> Res {
        let buf = self.bufs.of(kind);
        let mirror = self.bufs.mirror.addr;
        let n = len / PAGE;
        let k = kind.name();
        let driver = self.driver.name();
        let at = |w: &str| format!("{driver} {w} {k} {} MiB", len / MIB);
        let s = self.stamp();
        populate(buf, len, s)?;
        self.timed("read", k, len, || ioctl(dev, READ, buf.addr, mirror, n, None, &at("read")))?;
        check(mirror, len, s, &at("read"))?;
        let s = self.stamp();
        mark(mirror, len, s);
        self.timed("write", k, len, || ioctl(dev, WRITE, buf.addr, mirror, n, None, &at("write")))?;
        check(buf.addr, len, s, &at("write"))?;
        Ok(())
    }

    /// Load, warm-up, the workloads at every size, and the unload with the largest buffer
    /// resident on the device.
    fn run(&mut self, sizes: &[usize], ko: &str) -> Res {
        if self.rep.is_some() && self.on("kmem") {
            self.before_load = Some(kmem::Snap::take()?);
        }
        let params = match self.driver {
            Driver::C => "",
            Driver::Rust => self.opts.rust_args.as_str(),
        };
        let ns = load(ko, params)?;
        self.sample("load", "-", 0, ns);
        // `body` has closed the device when it returns, so the module can go.
        let body = self.body(sizes);
        let unloaded = unload(self.driver.module());
        let (len, s) = body?;
        let ns = unloaded?;
        self.sample("unload", Kind::Small.name(), len, ns);
        check(self.bufs.small.addr, len, s, "data evicted at unload")
    }

    fn body(&mut self, sizes: &[usize]) -> Res<(usize, u64)> {
        let dev = Dev::open(DEVICE).map_err(|e| format!("{e:?}"))?;
        let largest = *sizes.last().expect("sizes");
        // Untimed warm-up: every workload once at the smallest size (each code path runs once
        // before it is timed: under TCG its first run pays for translation), and the largest
        // buffer of each kind there and back (the device's memory is allocated on first use).
        let rep = self.rep.take();
        for kind in [Kind::Small, Kind::Huge] {
            self.workloads(&dev, kind, sizes[0])?;
        }
        self.rep = rep;
        for kind in [Kind::Small, Kind::Huge] {
            let buf = self.bufs.of(kind);
            let s = self.stamp();
            populate(buf, largest, s)?;
            let n = largest / PAGE;
            ioctl(&dev, MIGRATE_TO_DEV, buf.addr, self.bufs.mirror.addr, n, Some(n), "warm-up to_dev")?;
            ioctl(&dev, MIGRATE_TO_SYS, buf.addr, 0, n, None, "warm-up to_sys")?;
            placed(&dev, buf.addr, n, false, "warm-up to_sys")?;
        }
        if let Some(before) = self.before_load.take() {
            // What loading and a round trip of the largest buffers left: the device memory's
            // fixed cost with nothing resident.
            let d = before.to(&kmem::Snap::take()?);
            self.kmem_sample("pool", largest, &d);
        }
        if self.rep.is_some() && self.on("kmem") {
            for mib in self.opts.kmem.clone() {
                self.kmem(&dev, mib * MIB)?;
            }
        }
        if self.rep.is_some() && self.on("conc") {
            let second = Dev::open(DEVICE).map_err(|e| format!("{e:?}"))?;
            self.concurrency([&dev, &second], self.opts.conc * MIB)?;
        }
        for kind in [Kind::Small, Kind::Huge] {
            for &len in sizes {
                for _ in 0..runs(len) {
                    self.workloads(&dev, kind, len)?;
                }
            }
        }
        // Leave the largest 4 KiB buffer on the device for the unload.
        let buf = &self.bufs.small;
        let s = self.stamp();
        populate(buf, largest, s)?;
        let n = largest / PAGE;
        ioctl(&dev, MIGRATE_TO_DEV, buf.addr, self.bufs.mirror.addr, n, Some(n), "unload to_dev")?;
        Ok((largest, s))
    }
}

impl Turn<'_> {
    fn kmem_sample(&self, what: &str, bytes: usize, d: &kmem::Delta) {
        if let Some(rep) = self.rep {
            println!(
                "# kmem,{},{what},4k,{bytes},{rep},{},{},{},{}",
                self.driver.name(),
                d.total,
                d.slab,
                d.vmalloc,
                d.page_tables
            );
        }
    }

    /// The kernel memory `len` bytes of 4 KiB pages cost resident on the device (after
    /// MIGRATE_TO_DEV) and mirrored (after READ of system memory). Device-private memory is
    /// backed by a system page per page in both drivers, so a resident page must cost at
    /// least a page.
    fn kmem(&mut self, dev: &Dev, len: usize) -> Res {
        let buf = self.bufs.of(Kind::Small);
        let mirror = self.bufs.mirror.addr;
        let n = len / PAGE;
        let driver = self.driver.name();
        let at = |w: &str| format!("{driver} kmem {w} {} MiB", len / MIB);
        let s = self.stamp();
        populate(buf, len, s)?;
        let before = kmem::Snap::take()?;
        ioctl(dev, MIGRATE_TO_DEV, buf.addr, mirror, n, Some(n), &at("to_dev"))?;
        let d = before.to(&kmem::Snap::take()?);
        check(mirror, len, s, &at("to_dev readback"))?;
        placed(dev, buf.addr, n, true, &at("to_dev"))?;
        // The device pages took the anon pages' place in `AnonPages`.
        if d.anon.unsigned_abs() > len as u64 / 16 {
            return Err(format!("{}: AnonPages changed by {} bytes, not about 0", at("dev"), d.anon));
        }
        let d = d.resident(len);
        self.kmem_sample("dev", len, &d);
        // Other activity moves the free count by some tens of KiB either way.
        if d.total < len as i64 - KMEM_NOISE {
            return Err(format!(
                "{}: {} bytes of kernel memory for {len} bytes resident: less than their backing",
                at("dev"),
                d.total
            ));
        }
        ioctl(dev, MIGRATE_TO_SYS, buf.addr, 0, n, None, &at("to_sys"))?;
        placed(dev, buf.addr, n, false, &at("to_sys"))?;
        check(buf.addr, len, s, &at("to_sys"))?;

        let s = self.stamp();
        populate(buf, len, s)?;
        let before = kmem::Snap::take()?;
        ioctl(dev, READ, buf.addr, mirror, n, None, &at("read"))?;
        let d = before.to(&kmem::Snap::take()?);
        self.kmem_sample("read", len, &d);
        check(mirror, len, s, &at("read"))
    }
}

/// How far the kernel memory measured across an operation moves without it, at most (seen:
/// 60 KiB either way).
const KMEM_NOISE: i64 = 256 * 1024;

/// Bytes a turn moves at least per workload and size: below it, a size runs several times a
/// turn (at most [`MAX_RUNS`]), each run a sample. An operation of a few milliseconds is
/// within a timer tick or two of its noise under TCG; more samples keep its median stable.
const RUN_BYTES: usize = 32 * MIB;
const MAX_RUNS: usize = 8;

/// How many times a turn runs the workloads at `len` bytes.
fn runs(len: usize) -> usize {
    (RUN_BYTES / len.max(1)).clamp(1, MAX_RUNS)
}

fn main() {
    let o = parse_args();
    let largest = *o.sizes.last().expect("sizes") * MIB;
    let sizes: Vec<usize> = o.sizes.iter().map(|s| s * MIB).collect();
    let mut k = Ktap::stdout();
    k.version();
    k.comment(&format!(
        "dmirror-perf: seed {} reps {} warmup {} sizes {:?} MiB",
        o.seed, o.reps, o.warmup, o.sizes
    ));
    k.comment("timings under TCG are only meaningful as ratios within this boot");
    k.plan(2 + 2 * (o.warmup + o.reps));
    for d in [Driver::C, Driver::Rust] {
        if loaded(d.module()) {
            if let Err(e) = unload(d.module()) {
                println!("# {e}");
            }
        }
    }
    // Before the buffers, so that its own are gone by then.
    result(&mut k, ceiling(largest, o.reps), "memcpy_ceiling");
    let bufs = match Buffers::new(largest) {
        Ok(b) => b,
        Err(e) => {
            k.comment(&format!("buffers: {e}"));
            k.bail_out("cannot map the buffers");
            std::process::exit(1);
        }
    };
    result(&mut k, thp_backing(&bufs, largest), "thp_backing");
    let mut rng = Rng::new(o.seed);
    let warm_sizes: Vec<usize> = sizes.iter().copied().take(2).collect();
    let mut turns = Vec::new();
    for _ in 0..o.warmup {
        turns.push((Driver::C, None));
        turns.push((Driver::Rust, None));
    }
    for rep in 0..o.reps {
        let pair = if rep % 2 == 0 {
            [Driver::C, Driver::Rust]
        } else {
            [Driver::Rust, Driver::C]
        };
        for d in pair {
            turns.push((d, Some(rep)));
        }
    }
    // Every recorded fault latency, by driver, workload and kind.
    let mut pooled: BTreeMap<(&str, &str, &str), Vec<u32>> = BTreeMap::new();
    for (driver, rep) in turns {
        let ko = match driver {
            Driver::C => &o.ko_c,
            Driver::Rust => &o.ko_rust,
        };
        let mut turn = Turn {
            driver,
            rep,
            bufs: &bufs,
            rng: Rng::new(rng.next()),
            profile: &o.profile,
            opts: &o,
            lat: BTreeMap::new(),
            before_load: None,
        };
        let (name, sz) = match rep {
            Some(r) => (format!("turn_{r}_{}", driver.name()), &sizes),
            None => (format!("warmup_{}", driver.name()), &warm_sizes),
        };
        let t = Instant::now();
        let r = turn.run(sz, ko);
        println!("# {name}: {:.1} s", t.elapsed().as_secs_f64());
        if let Some(rep) = rep {
            for ((w, kind), mut v) in std::mem::take(&mut turn.lat) {
                v.sort_unstable();
                println!(
                    "# lat,{},{w},{kind},{rep},{},{},{},{}",
                    driver.name(),
                    v.len(),
                    lat::pct(&v, 50.0),
                    lat::pct(&v, 99.0),
                    v.last().copied().unwrap_or(0)
                );
                pooled.entry((driver.name(), w, kind)).or_default().extend_from_slice(&v);
            }
        }
        result(&mut k, r, &name);
    }
    for ((d, w, kind), mut v) in pooled {
        v.sort_unstable();
        let q: Vec<String> = lat::quantiles(&v).iter().map(u32::to_string).collect();
        println!("# latq,{d},{w},{kind},{},{}", v.len(), q.join(";"));
    }
    std::process::exit(i32::from(k.failed() != 0))
}

/// Prints the result of test `name`, the reason of a failure in a diagnostic line before it.
fn result(k: &mut Ktap<Stdout>, r: Res, name: &str) {
    if let Err(e) = &r {
        k.comment(&format!("{name}: {e}"));
    }
    k.result(r.is_ok(), name);
}

/// Page offsets between the ceiling's source and destination tried for each sample.
const CEILING_OFFSETS: [usize; 6] = [0, 1, 3, 17, 64, 255];

/// The CPU's copy bandwidth in this guest: `memcpy` of the largest size between two buffers
/// of present 4 KiB pages, `reps` samples after an unrecorded one. Under TCG the rate depends
/// on where the two buffers sit relative to each other (its software TLB), by up to 6 times
/// here; a sample is the fastest copy over a few relative placements, so that the ceiling is
/// one.
fn ceiling(len: usize, reps: usize) -> Res {
    let span = 2 * len + (CEILING_OFFSETS[CEILING_OFFSETS.len() - 1] + 1) * PAGE;
    let m = Map::anon(span).map_err(|e| format!("mmap: {e:?}"))?;
    // 4 KiB pages: under TCG they copy faster than huge pages.
    // SAFETY: Advice on our own mapping.
    unsafe { libc::madvise(m.addr as *mut _, span, libc::MADV_NOHUGEPAGE) };
    let bytes = m.bytes();
    bytes.fill(1);
    let (src, rest) = bytes.split_at_mut(len);
    for rep in 0..reps + 1 {
        let mut best = u64::MAX;
        for k in CEILING_OFFSETS {
            let dst = &mut rest[k * PAGE..k * PAGE + len];
            let t = Instant::now();
            dst.copy_from_slice(src);
            best = best.min(t.elapsed().as_nanos() as u64);
        }
        if rep > 0 {
            println!("# bench,cpu,memcpy,-,{len},{},{best}", rep - 1);
        }
    }
    Ok(())
}

const TRACING: &str = "/sys/kernel/tracing";

/// Switches ftrace's function profiler on (which resets it) or off.
fn profiler(on: bool) -> Res {
    let path = format!("{TRACING}/function_profile_enabled");
    std::fs::write(&path, if on { "1" } else { "0" }).map_err(|e| format!("{path}: {e}"))
}

/// The `n` functions with the most time over all CPUs: (name, hits, microseconds).
fn profile_top(n: usize) -> Res<Vec<(String, u64, f64)>> {
    let mut all: std::collections::HashMap<String, (u64, f64)> = std::collections::HashMap::new();
    let dir = format!("{TRACING}/trace_stat");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    for e in entries.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        // "  Function   Hit   Time   Avg   s^2", then "  name  hits  123.4 us  ...".
        for l in text.lines().skip(2) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if let [name, hits, time, unit, ..] = f.as_slice() {
                let (Ok(h), Ok(t)) = (hits.parse::<u64>(), time.parse::<f64>()) else {
                    continue;
                };
                let us = if *unit == "ms" { t * 1000.0 } else { t };
                let v = all.entry(name.to_string()).or_default();
                v.0 += h;
                v.1 += us;
            }
        }
    }
    let mut v: Vec<(String, u64, f64)> = all.into_iter().map(|(k, (h, t))| (k, h, t)).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v.truncate(n);
    Ok(v)
}

/// The THP buffer is really backed by huge pages (else its rows would measure 4 KiB pages).
fn thp_backing(bufs: &Buffers, len: usize) -> Res {
    populate(&bufs.huge, len, 0)?;
    let smaps = std::fs::read_to_string("/proc/self/smaps").map_err(|e| format!("smaps: {e}"))?;
    let start = format!("{:x}-", bufs.huge.addr);
    let huge_kb: usize = smaps
        .split('\n')
        .skip_while(|l| !l.starts_with(&start))
        .take_while(|l| l.starts_with(&start) || !l.contains('-') || l.contains(':'))
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no AnonHugePages line for the THP buffer")?;
    println!("# thp buffer: {} of {} KiB in huge pages", huge_kb, len / 1024);
    if huge_kb * 1024 < len - THP {
        return Err(format!("only {huge_kb} KiB of {} KiB are THP", len / 1024));
    }
    Ok(())
}
