//! The random phase, in a process of its own (forked by the supervisor, which watches it):
//! threads making random calls on shared descriptors of every device node, and now and then
//! forking a child that makes calls of its own, closing and reopening a descriptor, or
//! changing the churn region's mapping. At the end it checks its own memory.
//!
//! Each device node has two descriptor slots. A reopen either swaps a new open file in with
//! `dup2()` (the number never goes away) or closes the number and opens another; a slot's
//! generation is odd while that happens, so a call that raced with it may get `EBADF` and
//! no other call may.

use crate::arena::{Arena, Kind};
use crate::call::{Call, Caller};
use crate::shared::{now_ns, Shared, CHILD_SLOTS};
use dmirror_suite::hmm::Rng;
use std::os::fd::IntoRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// What the random phase needs.
pub struct Opts {
    pub calls: u64,
    pub threads: usize,
    pub seed: u64,
    /// The device nodes that exist.
    pub devices: Vec<usize>,
}

/// A descriptor slot.
struct FdSlot {
    fd: AtomicI32,
    /// Odd while the descriptor is being closed and reopened.
    generation: AtomicU64,
    /// Held by the thread reopening it.
    reopening: Mutex<()>,
}

/// The state the worker's threads share.
struct Worker<'a> {
    opts: &'a Opts,
    shared: &'static Shared,
    /// Built once every thread runs.
    arena: OnceLock<Arena>,
    /// Two slots per device node (none for a node that does not exist).
    fds: Vec<Vec<FdSlot>>,
    /// Held while changing the churn region; whether it is read-write now.
    churn: Mutex<bool>,
    /// Forked children that did not exit cleanly.
    child_failures: Mutex<Vec<String>>,
    /// Threads started.
    started: AtomicUsize,
    /// The mappings once every thread runs (see [`Caller::reaches_out`]).
    maps: OnceLock<Vec<(u64, u64, String)>>,
}

/// The path of device node `dev`.
fn node(dev: usize) -> String {
    format!("/dev/hmm_dmirror{dev}")
}

/// Opens device node `dev`; the raw descriptor is the caller's to close.
fn open(dev: usize) -> std::io::Result<i32> {
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(node(dev))?
        .into_raw_fd())
}

/// Runs the random phase and the arena checks, recording into `shared`; never returns.
pub fn run(shared: &'static Shared, opts: &Opts) -> ! {
    let mut fds = Vec::new();
    for dev in 0..4 {
        let mut slots = Vec::new();
        if opts.devices.contains(&dev) {
            for _ in 0..2 {
                let fd = open(dev).unwrap_or_else(|e| panic!("open {}: {e}", node(dev)));
                slots.push(FdSlot {
                    fd: AtomicI32::new(fd),
                    generation: AtomicU64::new(0),
                    reopening: Mutex::new(()),
                });
            }
        }
        fds.push(slots);
    }
    let worker = Worker {
        opts,
        shared,
        arena: OnceLock::new(),
        fds,
        churn: Mutex::new(true),
        child_failures: Mutex::new(Vec::new()),
        started: AtomicUsize::new(0),
        maps: OnceLock::new(),
    };
    let mut problems = Vec::new();
    let mut started = 0;
    std::thread::scope(|s| {
        for t in 0..opts.threads {
            let w = &worker;
            s.spawn(move || w.thread(t));
        }
        while worker.started.load(Ordering::Acquire) < opts.threads {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The device mapping keeps its own file open.
        let devmap = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(node(opts.devices[0]))
            .expect("cannot open the device to map it");
        let arena = Arena::new(opts.threads, opts.seed, &devmap);
        drop(devmap);
        problems.extend(unmapped_assumptions());
        problems.extend(arena.holes_still_empty());
        if !problems.is_empty() {
            // The expectations would be wrong, and calls could reach memory not the arena's.
            shared.stop.store(true, Ordering::Relaxed);
        }
        let _ = worker.maps.set(Arena::maps());
        let _ = worker.arena.set(arena);
        started = now_ns();
    });
    shared
        .fin
        .phase_ns
        .store(now_ns() - started, Ordering::Relaxed);
    let arena = worker.arena.get().expect("the arena was built");
    // Checked with the descriptors open (the CPU brings device pages back), then after the
    // last close evicted the devices' memory.
    problems.extend(arena.holes_still_empty());
    problems.extend(arena.verify());
    for slots in &worker.fds {
        for s in slots {
            // SAFETY: Closes a descriptor of ours; no thread uses it any more.
            unsafe { libc::close(s.fd.load(Ordering::Relaxed)) };
        }
    }
    let devmap = arena.region(Kind::DevMap);
    // SAFETY: Unmaps our own device mapping, which nothing uses any more.
    unsafe { libc::munmap(devmap.start as *mut _, devmap.len as usize) };
    problems.extend(
        arena
            .verify()
            .into_iter()
            .map(|p| format!("after the last close: {p}")),
    );
    problems.extend(
        worker
            .child_failures
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default(),
    );
    let text = if problems.is_empty() {
        format!(
            "the pattern, THP, read-only and mirror regions are intact (through the CPU, then after the last close), the holes unmapped, {} forked children exited cleanly",
            shared.fin.forks.load(Ordering::Relaxed)
        )
    } else {
        problems.join("\n")
    };
    shared.set_arena(problems.is_empty(), &text);
    // SAFETY: Ends the worker; every thread has been joined.
    unsafe { libc::_exit(0) }
}

/// Checks that the addresses the fuzzer treats as unmapped outside the arena are: nothing
/// below 64 KiB, nothing at the last page under 47 bits or above.
fn unmapped_assumptions() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut bad = Vec::new();
    for line in maps.lines() {
        // The vsyscall page is the kernel's gate area, not a mapping the driver can see.
        if line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((a, b)) = line.split_once(' ').and_then(|(r, _)| r.split_once('-')) else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        if a < 0x10000 || b > 0x7fff_ffff_f000 {
            bad.push(format!(
                "an address the fuzzer treats as unmapped is mapped: {line}"
            ));
        }
    }
    bad
}

impl Worker<'_> {
    /// The arena (built before any thread makes a call).
    fn arena(&self) -> &Arena {
        self.arena.get().expect("the threads wait for the arena")
    }

    /// A caller for thread `t` (or a child of it) with watchdog slot `slot`.
    fn caller(&self, t: usize, rng: Rng, slot: usize, child: bool) -> Caller<'_> {
        Caller {
            maps: self.maps.get().map_or(&[], Vec::as_slice),
            arena: self.arena(),
            shared: self.shared,
            rng,
            thread: t,
            slot,
            threads: self.opts.threads,
            devices: &self.opts.devices,
            seed: self.opts.seed,
            child,
            made: 0,
        }
    }

    /// Whether the random phase is over: enough calls, or the supervisor said stop.
    fn done(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
            || self.shared.calls.load(Ordering::Relaxed) >= self.opts.calls
    }

    /// One thread: random calls, and now and then a fork, a reopen or a churn.
    fn thread(&self, t: usize) {
        self.started.fetch_add(1, Ordering::Release);
        while self.arena.get().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let seed = self.opts.seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut c = self.caller(t, Rng::new(seed), t, false);
        while !self.done() {
            match c.rng.below(10_000) {
                0..=6 => self.fork_child(&mut c),
                7..=31 => self.reopen(&mut c.rng),
                32..=71 => self.churn(&mut c.rng),
                _ => {}
            }
            let call = c.gen();
            if c.reaches_out(&call) {
                continue;
            }
            let slot = &self.fds[call.dev][c.rng.below(2) as usize];
            let generation = slot.generation.load(Ordering::Acquire);
            let out = c.issue(slot.fd.load(Ordering::Acquire), &call);
            let raced =
                generation % 2 == 1 || slot.generation.load(Ordering::Acquire) != generation;
            c.check(&call, &out, raced);
        }
    }

    /// Forks a child that makes a few dozen calls, on the inherited descriptors (which
    /// mirror this process's address space) and on one of its own, then exits; waits for it.
    fn fork_child(&self, parent: &mut Caller<'_>) {
        let seed = parent.rng.next();
        // The child only makes system calls, uses its copy of the memory and exits with `_exit`.
        // SAFETY: So it takes none of the locks other threads may hold.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut c = self.caller(
                parent.thread,
                Rng::new(seed),
                CHILD_SLOTS + parent.thread,
                true,
            );
            let own_dev = c.devices[c.rng.below(c.devices.len() as u64) as usize];
            let own = open(own_dev).unwrap_or(-1);
            for _ in 0..16 + c.rng.below(32) {
                let mut call: Call = c.gen();
                if c.reaches_out(&call) {
                    continue;
                }
                let (fd, raced) = if own >= 0 && c.rng.below(3) == 0 {
                    call.dev = own_dev;
                    (own, false)
                } else {
                    let s = &self.fds[call.dev][c.rng.below(2) as usize];
                    (
                        s.fd.load(Ordering::Relaxed),
                        s.generation.load(Ordering::Relaxed) % 2 == 1,
                    )
                };
                let out = c.issue(fd, &call);
                c.check(&call, &out, raced);
            }
            // SAFETY: Ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        if pid < 0 {
            return;
        }
        self.shared.fin.forks.fetch_add(1, Ordering::Relaxed);
        let mut status = 0;
        // SAFETY: Waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            if let Ok(mut v) = self.child_failures.lock() {
                v.push(format!(
                    "a forked child of thread {} died: wait status {status:#x} (seed {})",
                    parent.thread, self.opts.seed
                ));
            }
        }
    }

    /// Closes a descriptor slot and opens the device again: swapped in with `dup2()`, or
    /// closed and reopened under another number.
    fn reopen(&self, rng: &mut Rng) {
        let dev = self.opts.devices[rng.below(self.opts.devices.len() as u64) as usize];
        let s = &self.fds[dev][rng.below(2) as usize];
        let Ok(_held) = s.reopening.try_lock() else {
            return;
        };
        let Ok(new) = open(dev) else {
            return;
        };
        if rng.below(10) < 7 {
            // Then closes the spare one.
            // SAFETY: Replaces our own descriptor with another of ours, atomically.
            unsafe {
                libc::dup2(new, s.fd.load(Ordering::Relaxed));
                libc::close(new);
            }
        } else {
            s.generation.fetch_add(1, Ordering::AcqRel);
            let old = s.fd.swap(-1, Ordering::AcqRel);
            // SAFETY: Closes our own descriptor; calls that raced with it may get EBADF.
            unsafe { libc::close(old) };
            s.fd.store(new, Ordering::Release);
            s.generation.fetch_add(1, Ordering::AcqRel);
        }
        self.shared.fin.reopens.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes the churn region: `PROT_NONE`, read-write again, `MADV_DONTNEED`, replaced
    /// by a new mapping, or written to.
    fn churn(&self, rng: &mut Rng) {
        let r = *self.arena().region(Kind::Churn);
        let Ok(mut rw) = self.churn.try_lock() else {
            return;
        };
        let (p, len) = (r.start as *mut libc::c_void, r.len as usize);
        let prot_rw = libc::PROT_READ | libc::PROT_WRITE;
        // The calls may find the region in any state.
        // SAFETY: Every change is to the churn region, which only this function touches.
        unsafe {
            match rng.below(5) {
                0 => {
                    libc::mprotect(p, len, libc::PROT_NONE);
                    *rw = false;
                }
                1 => {
                    libc::mprotect(p, len, prot_rw);
                    *rw = true;
                }
                2 => {
                    libc::madvise(p, len, libc::MADV_DONTNEED);
                }
                3 => {
                    let q = libc::mmap(
                        p,
                        len,
                        prot_rw,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    );
                    libc::madvise(p, len, libc::MADV_HUGEPAGE);
                    *rw = q == p;
                }
                _ if *rw => {
                    let page = rng.below(r.pages()) as usize;
                    std::ptr::write_volatile(p.cast::<u8>().add(page * 4096), rng.next() as u8);
                }
                _ => {}
            }
        }
    }
}
