//! The probe of large `npages`: every command on every device node with ranges far larger
//! than anything mapped, each with a `ptr` that has 64 bytes of room.
//!
//! Every command must answer at once: the ones that fault, migrate or pin stop at the first
//! unmapped page, the ones that copy out stop when `ptr` runs out, and the others do not
//! depend on the size of the range. First each command runs from address 0 with `2^20` and
//! then `2^26` pages: a command that takes more than [`LINEAR_SECS`] with the larger and more
//! than [`LINEAR_RATIO`] times as long as with the smaller takes time in proportion to
//! `npages`; it fails the probe, is not given more, and the random phase keeps its `npages`
//! small (with `2^52 - 1` such a call would not return for years, and it would hold locks that
//! every invalidation of the caller's address space waits for). The others then run with the
//! largest `npages` whose range does not wrap, from 0, from a kernel address and from a
//! mapping of 16 pages followed by a hole. A call that has not returned after [`PROBE_SECS`]
//! hangs: the probe names it and goes on in a new child without that command (the stuck child
//! cannot be killed while it is in the kernel; it runs at `SCHED_IDLE`).

use crate::call::{allowed_names, bit, known, max_npages, name, Allowed, KERNEL, OK};
use crate::shared::{errno_name, now_ns, Shared, CAT_HUGE, PROBE_SLOTS};
use dmirror_abi::uapi::nr::{
    CHECK_EXCLUSIVE, EXCLUSIVE, FLAGS, MIGRATE_TO_DEV, MIGRATE_TO_SYS, READ, READ_UNLOCKED,
    RELEASE, SNAPSHOT, WRITE,
};
use dmirror_abi::uapi::{iowr, Cmd, PAGE};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Seconds a probe call may take.
pub const PROBE_SECS: u64 = 60;
/// Seconds above which the `2^26`-page call counts as slow.
const LINEAR_SECS: f64 = 0.2;
/// How many times longer than the `2^20`-page call a slow `2^26`-page call must take to count
/// as linear (64 times as many pages).
const LINEAR_RATIO: f64 = 16.0;

/// Where a probe's range starts, and how large it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum From {
    /// Address 0, `2^20` pages.
    Small,
    /// Address 0, `2^26` pages.
    Large,
    /// Address 0, the largest `npages`.
    Zero,
    Kernel,
    Mapping,
}

impl From {
    /// The probe's `npages` from `addr`.
    fn npages(self, addr: u64) -> u64 {
        match self {
            From::Small => 1 << 20,
            From::Large => 1 << 26,
            _ => max_npages(addr),
        }
    }
}

/// Runs the probe on `devices`; returns the report lines, and whether every command passed.
pub fn run(shared: &'static Shared, devices: &[usize]) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut all_ok = true;
    for &dev in devices {
        // First the two sizes from 0, for every command not found linear yet.
        let hung = shared.hung.load(Ordering::Relaxed);
        let sizes: Vec<(u64, From)> = (0..10)
            .filter(|nr| hung & (1 << nr) == 0)
            .flat_map(|nr| [(nr, From::Small), (nr, From::Large)])
            .collect();
        let times = run_items(shared, dev, sizes, &mut lines, &mut all_ok);
        for nr in 0..10 {
            let t = |f| {
                times
                    .iter()
                    .find(|&&(n, g, _)| n == nr && g == f)
                    .map(|&(_, _, t)| t)
            };
            if let (Some(small), Some(large)) = (t(From::Small), t(From::Large)) {
                if large > LINEAR_SECS && large > LINEAR_RATIO * small {
                    lines.push(format!(
                        "{} on hmm_dmirror{dev} takes time in proportion to npages, not to what is mapped: {small:.3} s for 2^20 pages from 0, {large:.3} s for 2^26; with 2^52 - 1 it would not return (not probed further)",
                        name(nr),
                    ));
                    shared.hung.fetch_or(1 << nr, Ordering::Relaxed);
                    all_ok = false;
                }
            }
        }
        // Then the largest npages, for the others.
        let hung = shared.hung.load(Ordering::Relaxed);
        let items: Vec<(u64, From)> = (0..10)
            .filter(|nr| hung & (1 << nr) == 0)
            .flat_map(|nr| [(nr, From::Zero), (nr, From::Kernel), (nr, From::Mapping)])
            .collect();
        run_items(shared, dev, items, &mut lines, &mut all_ok);
    }
    (lines, all_ok)
}

/// Runs `items` on device `dev`, in a new child after each one that hangs (without the other
/// items of its command, which is marked hung); returns the seconds each call took.
fn run_items(
    shared: &'static Shared,
    dev: usize,
    mut items: Vec<(u64, From)>,
    lines: &mut Vec<String>,
    all_ok: &mut bool,
) -> Vec<(u64, From, f64)> {
    let mut times = Vec::new();
    while !items.is_empty() {
        let done = probe_child(shared, dev, &items, lines, all_ok);
        let n = done.len();
        times.extend(done);
        if n == items.len() {
            break;
        }
        let stuck = items[n].0;
        shared.hung.fetch_or(1 << stuck, Ordering::Relaxed);
        items = items[n + 1..]
            .iter()
            .copied()
            .filter(|&(nr, _)| nr != stuck)
            .collect();
    }
    times
}

/// Runs `items` on device `dev` in a child; returns the seconds each took, for those that
/// returned (in order, up to the one that hung, if one did).
fn probe_child(
    shared: &'static Shared,
    dev: usize,
    items: &[(u64, From)],
    lines: &mut Vec<String>,
    all_ok: &mut bool,
) -> Vec<(u64, From, f64)> {
    let slot = &shared.slots[PROBE_SLOTS + dev];
    slot.done.store(0, Ordering::Relaxed);
    let times = &shared.probe_ns;
    // SAFETY: The supervisor is single-threaded; the child probes and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        child(shared, dev, items);
    }
    if pid < 0 {
        lines.push(format!("fork: {}", std::io::Error::last_os_error()));
        *all_ok = false;
        return Vec::new();
    }
    let result = |n: usize| -> Vec<(u64, From, f64)> {
        items[..n]
            .iter()
            .enumerate()
            .map(|(i, &(nr, f))| (nr, f, times[i].load(Ordering::Relaxed) as f64 / 1e9))
            .collect()
    };
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let mut status = 0;
        // SAFETY: Polls our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                lines.push(format!("the probe of hmm_dmirror{dev} died: {status:#x}"));
                *all_ok = false;
            }
            return result(items.len());
        }
        if let Some(stuck) = slot.stuck(PROBE_SECS * 1_000_000_000) {
            let done = (slot.done.load(Ordering::Relaxed) as usize).min(items.len() - 1);
            lines.push(format!(
                "{stuck}: no return after {PROBE_SECS} s; {} not probed further (the stuck process is left at SCHED_IDLE)",
                name(items[done].0)
            ));
            *all_ok = false;
            // SAFETY: Signals our own child; it dies when the call returns, if ever.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return result(done);
        }
    }
}

/// What command `nr` must answer here: the range cannot be faulted, migrated or pinned to its
/// end (`EFAULT`, `EINVAL`), `ptr` has no room (`EFAULT`), or the command does not depend on
/// the range.
fn expected(nr: u64) -> Allowed {
    match nr {
        READ | WRITE | READ_UNLOCKED | EXCLUSIVE | SNAPSHOT => bit(libc::EFAULT),
        MIGRATE_TO_DEV | MIGRATE_TO_SYS => bit(libc::EINVAL),
        // The mapping's pages may be exclusive from the EXCLUSIVE before.
        CHECK_EXCLUSIVE => OK | bit(libc::EPERM),
        RELEASE | FLAGS => OK,
        _ => 0,
    }
}

/// Maps `pages` read-write pages followed by as many unmapped ones; returns the address.
fn mapping_before_hole(pages: usize) -> u64 {
    let len = 2 * pages * PAGE;
    // SAFETY: A fresh private mapping, then its second half unmapped: both ours.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert!(p != libc::MAP_FAILED, "mmap");
        libc::munmap(p.cast::<u8>().add(pages * PAGE).cast(), pages * PAGE);
        std::ptr::write_bytes(p.cast::<u8>(), 0x3c, pages * PAGE);
        p as u64
    }
}

/// The probe's child for device `dev`: the calls of `todo`, in order; never returns.
fn child(shared: &'static Shared, dev: usize, todo: &[(u64, From)]) -> ! {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: Changes this process's own scheduling policy.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/hmm_dmirror{dev}"))
        .expect("cannot open the device");
    let mapping = mapping_before_hole(16);
    let ptr = mapping_before_hole(1) + PAGE as u64 - 64;
    let slot = &shared.slots[PROBE_SLOTS + dev];
    for (i, &(nr, from)) in todo.iter().enumerate() {
        let addr = match from {
            From::Small | From::Large | From::Zero => 0,
            From::Kernel => KERNEL,
            From::Mapping => mapping,
        };
        let npages = from.npages(addr);
        let mut c = Cmd {
            addr,
            ptr,
            npages,
            cpages: u64::MAX,
            faults: u64::MAX,
        };
        let req = iowr(nr);
        slot.begin(
            dev,
            req,
            &c as *const Cmd as u64,
            c.addr,
            c.ptr,
            c.npages,
            std::process::id(),
        );
        let started = now_ns();
        // The driver refuses addresses it cannot reach.
        // SAFETY: It reads and writes `c` and memory of this process's own mappings.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), req as libc::c_ulong, &mut c) };
        let errno = if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        };
        let ns = now_ns() - started;
        shared.probe_ns[i].store(ns, Ordering::Relaxed);
        slot.end();
        shared.record(CAT_HUGE, errno, ns);
        let allowed = expected(known(req).unwrap_or(nr));
        if allowed & bit(errno) == 0 {
            shared.violation(
                CAT_HUGE,
                &format!(
                    "{} on hmm_dmirror{dev} from {from:?} ({addr:#x}), npages {npages:#x}, ptr with 64 bytes of room: got {}, allowed {}",
                    name(nr),
                    errno_name(errno),
                    allowed_names(allowed)
                ),
            );
        }
    }
    // SAFETY: Ends the child.
    unsafe { libc::_exit(0) }
}
