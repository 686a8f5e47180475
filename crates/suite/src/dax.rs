//! FS-DAX on `/dev/pmem0` (ext4, `-o dax=always`) and device-DAX on `/dev/pmem1`'s namespace:
//! ZONE_DEVICE pages of other drivers, their references seen through dmirror's pfn probe.

use crate::harness::{Case, Ctx, Fail, Fixture, R};
use crate::hmm::{fill, verify, Map, Pipe, THP};
use crate::inspect::{pfn_of, probe, Probe};
use crate::{diag, ensure, ensure_eq};
use dmirror_abi::layout::PMEM;
use dmirror_abi::uapi::{ioc, PAGE};
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const CASES: &[Case] = &[
    fsdax("mmap_read_write", fsdax_mmap_rw),
    fsdax("munmap_leaves_pages_idle", fsdax_munmap_idle),
    fsdax("fork_shared_and_private", fsdax_fork),
    fsdax("truncate_waits_for_reference", fsdax_truncate_waits),
    fsdax("punch_hole_waits_for_reference", fsdax_punch_waits),
    fsdax("pin_and_unpin", fsdax_pin),
    fsdax("longterm_pin_refused", fsdax_longterm_refused),
    fsdax("odirect_from_dax_buffer", fsdax_odirect),
    Case {
        name: "mmap_pin_unmap",
        fixture: Fixture::DevDax,
        timeout: 180,
        run: devdax_mmap_pin_unmap,
    },
    Case {
        name: "unbind_waits_for_reference",
        fixture: Fixture::DevDax,
        timeout: 180,
        run: devdax_unbind_waits_for_reference,
    },
];

const fn fsdax(name: &'static str, run: fn(&Ctx) -> R) -> Case {
    Case {
        name,
        fixture: Fixture::FsDax,
        timeout: 120,
        run,
    }
}

const MNT: &str = "/mnt/dax";
/// `statx()`'s attribute bit for a file whose mappings are DAX.
const STATX_ATTR_DAX: u64 = 0x0020_0000;

fn skip(why: impl Into<String>) -> Fail {
    Fail::Skip(why.into())
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Mounts `/dev/pmem0` on [`MNT`] with `-o dax=always`, once.
fn mounted() -> R {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if mounts.lines().any(|l| l.split(' ').nth(1) == Some(MNT)) {
        return Ok(());
    }
    if !std::path::Path::new("/dev/pmem0").exists() {
        return Err(skip("no /dev/pmem0 (no memmap= pmem region)"));
    }
    std::fs::create_dir_all(MNT)?;
    let (src, dst, fs, opts) = (
        CString::new("/dev/pmem0").unwrap(),
        CString::new(MNT).unwrap(),
        CString::new("ext4").unwrap(),
        CString::new("dax=always").unwrap(),
    );
    // SAFETY: All strings are NUL-terminated and live across the call.
    let r = unsafe {
        libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, opts.as_ptr().cast())
    };
    ensure!(r == 0, "mount /dev/pmem0 {MNT} -o dax=always: {}", errno());
    Ok(())
}

/// A file on the DAX file system, `len` bytes, mapped shared.
struct DaxFile {
    file: std::fs::File,
    path: String,
    /// Taken (and so unmapped) by cases that unmap it.
    mapping: Option<Map>,
}

impl DaxFile {
    fn new(name: &str, len: usize) -> R<DaxFile> {
        mounted()?;
        let path = format!("{MNT}/{name}");
        let _ = std::fs::remove_file(&path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.set_len(len as u64)?;
        let map = map_shared(&file, len, libc::MAP_SHARED)?;
        Ok(DaxFile {
            file,
            path,
            mapping: Some(map),
        })
    }

    fn map(&self) -> &Map {
        self.mapping.as_ref().expect("still mapped")
    }

    /// Unmaps the file.
    fn unmap(&mut self) {
        self.mapping = None;
    }

    /// Whether the kernel says the file's mappings are DAX.
    fn is_dax(&self) -> R<bool> {
        // SAFETY: An all-zero statx is a valid buffer.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        let path = CString::new(self.path.clone()).unwrap();
        // SAFETY: `path` and `st` are valid for the call.
        let r = unsafe {
            libc::statx(libc::AT_FDCWD, path.as_ptr(), 0, libc::STATX_BASIC_STATS, &mut st)
        };
        ensure!(r == 0, "statx {}: {}", self.path, errno());
        Ok(st.stx_attributes & STATX_ATTR_DAX != 0)
    }
}

impl Drop for DaxFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Maps `len` bytes of `file` at offset 0, 2 MiB aligned so that PMD mappings are possible.
pub(crate) fn map_shared(file: &impl AsRawFd, len: usize, flags: i32) -> R<Map> {
    let hole = Map::anon(len + THP)?;
    let addr = hole.addr.next_multiple_of(THP);
    // SAFETY: Maps the file over part of our own placeholder mapping.
    let p = unsafe {
        libc::mmap(
            addr as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_FIXED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(errno().into());
    }
    // SAFETY: Unmaps what is left of the placeholder around the file mapping.
    unsafe {
        if addr > hole.addr {
            libc::munmap(hole.addr as *mut _, addr - hole.addr);
        }
        let end = addr + len;
        if hole.addr + hole.len > end {
            libc::munmap(end as *mut _, hole.addr + hole.len - end);
        }
    }
    hole.forget();
    Ok(Map { addr, len })
}

/// The page frame at `addr` and what the probe says of it (it must be device memory).
pub(crate) fn probe_at(addr: usize) -> R<(u64, Probe)> {
    let pfn = pfn_of(addr)?.ok_or_else(|| Fail::Fail(format!("nothing mapped at {addr:#x}")))?;
    let p = probe(pfn)?.ok_or_else(|| Fail::Fail(format!("pfn {pfn:#x} is not device memory")))?;
    Ok((pfn, p))
}

pub(crate) fn probe_pfn(pfn: u64) -> R<Probe> {
    probe(pfn)?.ok_or_else(|| Fail::Fail(format!("pfn {pfn:#x} is not device memory")))
}

fn fsdax_mmap_rw(ctx: &Ctx) -> R {
    let mut f = DaxFile::new("rw", 4 << 20)?;
    ensure!(f.is_dax()?, "statx does not report STATX_ATTR_DAX for {}", f.path);
    let seed = ctx.config.seed ^ 0xda;
    fill(f.map().bytes(), seed);
    let (pfn, p) = probe_at(f.map().addr)?;
    ensure_eq!(p.kind.as_str(), "fsdax", "kind of a DAX file page");
    ensure!(p.folio_mapped && p.folio_refcount >= 1, "mapped DAX page: {p:?}");
    let (addr, len) = (f.map().addr, f.map().len);
    // SAFETY: Flushes our own mapping.
    ensure!(unsafe { libc::msync(addr as *mut _, len, libc::MS_SYNC) } == 0, "msync");
    f.unmap();
    let idle = probe_pfn(pfn)?;
    ensure!(
        idle.page_refcount == 0 && !idle.folio_mapped,
        "an unmapped FS-DAX page is not idle at refcount 0: {idle:?}"
    );
    let again = map_shared(&f.file, len, libc::MAP_SHARED)?;
    verify(again.bytes(), seed, "data mapped again")?;
    // The same through read(), not a mapping.
    verify(&std::fs::read(&f.path)?, seed, "data read through the file")
}

fn fsdax_munmap_idle(_ctx: &Ctx) -> R {
    let mut f = DaxFile::new("idle", THP)?;
    fill(f.map().bytes(), 3);
    let mut pfns = Vec::new();
    for i in (0..f.map().npages()).step_by(37) {
        pfns.push(probe_at(f.map().page(i))?.0);
    }
    f.unmap();
    for pfn in pfns {
        let p = probe_pfn(pfn)?;
        ensure!(
            p.page_refcount == 0 && !p.folio_mapped,
            "pfn {pfn:#x} not idle after munmap: {p:?}"
        );
    }
    Ok(())
}

fn fsdax_fork(ctx: &Ctx) -> R {
    let f = DaxFile::new("fork", 1 << 20)?;
    let seed = ctx.config.seed ^ 0xf0;
    fill(f.map().bytes(), seed);
    let private = map_shared(&f.file, f.map().len, libc::MAP_PRIVATE)?;
    let (shared_bytes, private_bytes) = (f.map().bytes(), private.bytes());
    // SAFETY: The child writes both mappings and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let ok = verify(shared_bytes, seed, "child").is_ok() && verify(private_bytes, seed, "c").is_ok();
        fill(shared_bytes, seed ^ 1);
        fill(private_bytes, seed ^ 2);
        // SAFETY: Ends the child.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: Waits for our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    ensure!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child saw wrong data");
    verify(shared_bytes, seed ^ 1, "the child's write through MAP_SHARED")?;
    verify(private_bytes, seed ^ 1, "MAP_PRIVATE view of the file after the child's writes")?;
    verify(&std::fs::read(&f.path)?, seed ^ 1, "file contents")
}

/// Holds a reference to the FS-DAX page at the start of `f` (vmsplice into a pipe), runs
/// `op` on the file in a thread, and checks that it waits until the reference is dropped.
fn waits_for_reference(name: &str, op: fn(&std::fs::File) -> std::io::Result<()>) -> R {
    let mut f = DaxFile::new(name, 1 << 20)?;
    fill(f.map().bytes(), 4);
    let (pfn, mapped) = probe_at(f.map().addr)?;
    let pipe = Pipe::new()?;
    ensure_eq!(pipe.vmsplice(f.map().addr, PAGE)?, PAGE, "vmsplice of one DAX page");
    let held = probe_pfn(pfn)?;
    ensure!(
        held.page_refcount > mapped.page_refcount,
        "the pipe holds no reference: mapped {mapped:?}, spliced {held:?}"
    );
    // Unmapped: only the pipe's reference remains.
    f.unmap();
    let file = f.file.try_clone()?;
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let t = std::thread::spawn(move || {
        let r = op(&file);
        d.store(true, Ordering::SeqCst);
        r
    });
    std::thread::sleep(Duration::from_millis(1500));
    let waited = !done.load(Ordering::SeqCst);
    // Dropping the reference lets it finish.
    let buf = pipe.read(PAGE)?;
    drop(pipe);
    let started = Instant::now();
    let res = t.join().map_err(|_| Fail::Fail("the thread panicked".into()))?;
    res.map_err(|e| Fail::Fail(format!("{name}: {e}")))?;
    diag!("{name} finished {:.0} ms after the reference was dropped", started.elapsed().as_secs_f64() * 1e3);
    ensure!(waited, "{name} did not wait for the page's reference to go");
    let idle = probe_pfn(pfn)?;
    ensure!(idle.page_refcount == 0, "page not idle after {name}: {idle:?}");
    verify(&buf, 4, "the spliced page's data")
}

fn fsdax_truncate_waits(_ctx: &Ctx) -> R {
    waits_for_reference("truncate", |f| f.set_len(0))
}

fn fsdax_punch_waits(_ctx: &Ctx) -> R {
    waits_for_reference("punch_hole", |f| {
        // SAFETY: Punches the first 2 MiB of our own file.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                THP as i64,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(errno())
        }
    })
}

/// `struct gup_test` of `mm/gup_test.h`.
#[repr(C)]
#[derive(Default)]
struct GupTest {
    get_delta_usec: u64,
    put_delta_usec: u64,
    addr: u64,
    size: u64,
    nr_pages_per_call: u32,
    gup_flags: u32,
    test_flags: u32,
    which_pages: [u32; 8],
}

/// `struct pin_longterm_test`.
#[repr(C)]
struct PinLongterm {
    addr: u64,
    size: u64,
    flags: u32,
}

/// `_IOC(dir, 'g', nr, size)`: a request of `gup_test`.
const fn ioc_g(dir: u64, nr: u64, size: usize) -> u64 {
    ioc(dir, b'g' as u64, nr, size as u64)
}
const PIN_BASIC_TEST: u64 = ioc_g(3, 5, std::mem::size_of::<GupTest>());
const PIN_LONGTERM_TEST_START: u64 = ioc_g(1, 7, std::mem::size_of::<PinLongterm>());
const PIN_LONGTERM_TEST_STOP: u64 = ioc_g(0, 8, 0);
const FOLL_WRITE: u32 = 1;
const PIN_LONGTERM_TEST_FLAG_USE_WRITE: u32 = 1;

fn gup_test() -> R<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/sys/kernel/debug/gup_test")
        .map_err(|e| skip(format!("no /sys/kernel/debug/gup_test (CONFIG_GUP_TEST): {e}")))
}

/// Pins and unpins `[addr, addr + len)` (FOLL_PIN, not long-term); returns the bytes pinned.
fn pin_basic(addr: usize, len: usize) -> R<u64> {
    let gup = gup_test()?;
    let mut t = GupTest {
        addr: addr as u64,
        size: len as u64,
        nr_pages_per_call: 64,
        gup_flags: FOLL_WRITE,
        ..GupTest::default()
    };
    // SAFETY: `t` is a valid `struct gup_test` for the call.
    let r = unsafe { libc::ioctl(gup.as_raw_fd(), PIN_BASIC_TEST as _, &mut t) };
    ensure!(r == 0, "PIN_BASIC_TEST: {}", errno());
    Ok(t.size)
}

/// Starts a long-term pin of `[addr, addr + len)`; stopped when the file closes.
fn pin_longterm(addr: usize, len: usize) -> R<Result<std::fs::File, std::io::Error>> {
    let gup = gup_test()?;
    let args = PinLongterm {
        addr: addr as u64,
        size: len as u64,
        flags: PIN_LONGTERM_TEST_FLAG_USE_WRITE,
    };
    // SAFETY: `args` is a valid `struct pin_longterm_test` for the call.
    let r = unsafe { libc::ioctl(gup.as_raw_fd(), PIN_LONGTERM_TEST_START as _, &args) };
    Ok(if r == 0 { Ok(gup) } else { Err(errno()) })
}

fn unpin_longterm(gup: &std::fs::File) -> R {
    // SAFETY: A command without argument.
    let r = unsafe { libc::ioctl(gup.as_raw_fd(), PIN_LONGTERM_TEST_STOP as _, 0) };
    ensure!(r == 0, "PIN_LONGTERM_TEST_STOP: {}", errno());
    Ok(())
}

fn fsdax_pin(_ctx: &Ctx) -> R {
    let f = DaxFile::new("pin", 1 << 20)?;
    fill(f.map().bytes(), 5);
    let (pfn, before) = probe_at(f.map().addr)?;
    let pinned = pin_basic(f.map().addr, f.map().len)?;
    ensure_eq!(pinned, f.map().len as u64, "bytes pinned");
    let after = probe_pfn(pfn)?;
    ensure_eq!(after.page_refcount, before.page_refcount, "refcount after pin and unpin");
    verify(f.map().bytes(), 5, "data after the pin")
}

fn fsdax_longterm_refused(_ctx: &Ctx) -> R {
    let f = DaxFile::new("longterm", 1 << 20)?;
    fill(f.map().bytes(), 6);
    let (pfn, before) = probe_at(f.map().addr)?;
    match pin_longterm(f.map().addr, f.map().len)? {
        Ok(gup) => {
            unpin_longterm(&gup)?;
            return Err(Fail::Fail("a long-term pin of FS-DAX memory was granted".into()));
        }
        Err(e) => diag!("long-term pin of FS-DAX refused: {e}"),
    }
    let after = probe_pfn(pfn)?;
    ensure_eq!(after.page_refcount, before.page_refcount, "refcount after the refused pin");
    Ok(())
}

fn fsdax_odirect(ctx: &Ctx) -> R {
    if !std::path::Path::new("/dev/pmem1").exists() {
        return Err(skip("no /dev/pmem1 (the second pmem region is device-DAX or absent)"));
    }
    let f = DaxFile::new("odirect", 1 << 20)?;
    let seed = ctx.config.seed ^ 0x0d;
    fill(f.map().bytes(), seed);
    let (pfn, before) = probe_at(f.map().addr)?;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open("/dev/pmem1")?;
    // O_DIRECT from the DAX mapping: the block layer pins the FS-DAX pages for the I/O.
    // SAFETY: Writes from our mapping, which is readable for its whole length.
    let n = unsafe { libc::pwrite(dev.as_raw_fd(), f.map().addr as *const _, f.map().len, 0) };
    ensure_eq!(n, f.map().len as isize, "O_DIRECT write from the DAX buffer");
    let back = Map::anon(f.map().len)?;
    // SAFETY: Reads into our own anonymous mapping.
    let n = unsafe { libc::pread(dev.as_raw_fd(), back.addr as *mut _, back.len, 0) };
    ensure_eq!(n, back.len as isize, "O_DIRECT read back");
    verify(back.bytes(), seed, "data through O_DIRECT")?;
    // And the other way: O_DIRECT read into the DAX mapping.
    fill(back.bytes(), seed ^ 9);
    // SAFETY: As above.
    let n = unsafe { libc::pwrite(dev.as_raw_fd(), back.addr as *const _, back.len, 0) };
    ensure_eq!(n, back.len as isize, "O_DIRECT write of a new pattern");
    // SAFETY: Reads into the DAX mapping, writable for its whole length.
    let n = unsafe { libc::pread(dev.as_raw_fd(), f.map().addr as *mut _, f.map().len, 0) };
    ensure_eq!(n, f.map().len as isize, "O_DIRECT read into the DAX buffer");
    verify(f.map().bytes(), seed ^ 9, "DAX buffer after O_DIRECT read")?;
    let after = probe_pfn(pfn)?;
    ensure_eq!(after.page_refcount, before.page_refcount, "refcount after the direct I/O");
    Ok(())
}

/// The namespace behind `/dev/pmem1`, or the device-DAX device made from it.
pub(crate) fn pmem1_namespace() -> R<String> {
    for e in std::fs::read_dir("/sys/bus/nd/devices")? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if !name.starts_with("namespace") {
            continue;
        }
        let res = std::fs::read_to_string(format!("/sys/bus/nd/devices/{name}/resource"))
            .unwrap_or_default();
        if u64::from_str_radix(res.trim().trim_start_matches("0x"), 16) == Ok(PMEM[1].0) {
            return Ok(name);
        }
    }
    Err(skip(format!("no nvdimm namespace at {:#x} (memmap=128M!1408M)", PMEM[1].0)))
}

pub(crate) fn ndctl(args: &[&str]) -> R<String> {
    let out = Command::new("ndctl")
        .args(args)
        .output()
        .map_err(|e| skip(format!("ndctl: {e}")))?;
    ensure!(
        out.status.success(),
        "ndctl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes `/dev/pmem1`'s namespace a device-DAX device, runs `f` with the path of its node,
/// then makes the namespace raw again, whatever happened.
pub fn with_devdax(f: impl FnOnce(&str) -> R) -> R {
    let ns = pmem1_namespace()?;
    ndctl(&["create-namespace", "-f", "-e", &ns, "-m", "devdax"])?;
    let result = (|| {
        let dax = std::fs::read_dir("/dev")?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("dax"))
            .ok_or_else(|| Fail::Fail("no /dev/dax* after create-namespace -m devdax".into()))?;
        f(&format!("/dev/{dax}"))
    })();
    // Back to a raw namespace, /dev/pmem1, whatever happened.
    let back = ndctl(&["create-namespace", "-f", "-e", &pmem1_namespace()?, "-m", "raw"]);
    result?;
    back.map(|_| ())
}

/// Opens a device-DAX node read-write.
pub(crate) fn open_rw(path: &str) -> R<std::fs::File> {
    Ok(std::fs::OpenOptions::new().read(true).write(true).open(path)?)
}

fn devdax_mmap_pin_unmap(ctx: &Ctx) -> R {
    with_devdax(|path| {
        let file = open_rw(path)?;
        let seed = ctx.config.seed ^ 0xdd;
        // First mapping: find the page frame, then leave it idle.
        let m = map_shared(&file, THP, libc::MAP_SHARED)?;
        fill(m.bytes(), seed);
        let (pfn, mapped) = probe_at(m.addr + PAGE)?;
        ensure_eq!(mapped.kind.as_str(), "generic", "kind of a device-DAX page");
        drop(m);
        let idle = probe_pfn(pfn)?;
        ensure!(!idle.folio_mapped, "device-DAX page still mapped after munmap: {idle:?}");
        diag!("device-DAX page at rest: refcount {} (folio order {})", idle.folio_refcount, idle.folio_order);
        // Map again: the same memory, the data kept.
        let m = map_shared(&file, THP, libc::MAP_SHARED)?;
        verify(m.bytes(), seed, "device-DAX data mapped again")?;
        let (pfn2, mapped) = probe_at(m.addr + PAGE)?;
        ensure_eq!(pfn2, pfn, "page frame of the same offset");
        ensure!(mapped.folio_mapped, "device-DAX page not mapped: {mapped:?}");
        // A long-term pin is allowed on device-DAX and holds references until dropped.
        let gup = pin_longterm(m.addr, m.len)?.map_err(|e| Fail::Fail(format!("long-term pin of device-DAX: {e}")))?;
        let pinned = probe_pfn(pfn)?;
        ensure!(
            pinned.folio_refcount > mapped.folio_refcount,
            "the pin took no reference: {mapped:?} then {pinned:?}"
        );
        unpin_longterm(&gup)?;
        drop(gup);
        ensure_eq!(probe_pfn(pfn)?.folio_refcount, mapped.folio_refcount, "refcount after unpin");
        drop(m);
        let rest = probe_pfn(pfn)?;
        ensure_eq!(rest.folio_refcount, idle.folio_refcount, "refcount at rest after map, pin, unpin, unmap");
        ensure!(!rest.folio_mapped, "still mapped: {rest:?}");
        Ok(())
    })
}

/// Keeps `pipe` open for ever in a process of its own, so its page references are never
/// dropped (on the stock kernel, dropping them after the device went touches freed memory).
fn keep_for_ever(pipe: Pipe) {
    // SAFETY: The child only sleeps; it touches no state shared with the parent's threads.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: Plain system calls in the child, which never returns.
        unsafe {
            libc::setsid();
            loop {
                libc::pause();
            }
        }
    }
    // The child holds its own copies of both ends.
    drop(pipe);
}

/// Unbinding a device-DAX device must wait for references to its pages, or the references
/// outlive the memory: a page that a pipe references (vmsplice(), which takes page references
/// like O_DIRECT does), unmapped by its process, then the namespace reconfigured. Stock 7.3
/// tears the device down at once (a free-at-one page cannot tell the pgmap it is still
/// referenced); the pipe is left holding a page whose memmap is gone.
fn devdax_unbind_waits_for_reference(ctx: &Ctx) -> R {
    let seed = ctx.config.seed ^ 0xdb;
    let mut held = None;
    let result = with_devdax(|path| {
        let file = open_rw(path)?;
        let m = map_shared(&file, THP, libc::MAP_SHARED)?;
        fill(m.bytes(), seed);
        let pipe = Pipe::new()?;
        ensure_eq!(pipe.vmsplice(m.addr, PAGE)?, PAGE, "bytes spliced into the pipe");
        drop(m);
        drop(file);
        let ns = pmem1_namespace()?;
        let mut ndctl = Command::new("ndctl")
            .args(["create-namespace", "-f", "-e", &ns, "-m", "raw"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let started = Instant::now();
        // Polls `ndctl` until it exits or `secs` have passed since the start.
        let mut exited = |secs: u64| -> R<Option<std::process::ExitStatus>> {
            while started.elapsed() < Duration::from_secs(secs) {
                if let Some(st) = ndctl.try_wait()? {
                    return Ok(Some(st));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(None)
        };
        // A reconfiguration takes well under a second here (0.2 s in the guest's log); one
        // that is still running after 5 waits for something.
        if let Some(st) = exited(5)? {
            held = Some(pipe);
            return Err(Fail::Fail(format!(
                "the namespace was reconfigured ({st}) in {:.1} s while a pipe still \
                 references one of its device-DAX pages",
                started.elapsed().as_secs_f64()
            )));
        }
        diag!("reconfiguration waits while the pipe holds the page");
        // Dropping the reference lets the teardown finish; the pipe delivers the data.
        let data = pipe.read(PAGE)?;
        let st = exited(60)?
            .ok_or_else(|| Fail::Fail("the reconfiguration did not finish after the reference was dropped".into()))?;
        ensure!(st.success(), "ndctl create-namespace -m raw: {st}");
        diag!("reconfigured {:.1} s after the start", started.elapsed().as_secs_f64());
        verify(&data, seed, "the data the pipe delivers")
    });
    if let Some(pipe) = held {
        keep_for_ever(pipe);
    }
    result
}
