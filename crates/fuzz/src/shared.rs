//! State the supervisor shares with the processes it forks, in one `MAP_SHARED` anonymous
//! mapping: results per category, what every calling thread is doing right now (for the
//! watchdog), the first violations as text, and the worker's final checks.
//!
//! Everything in it is an atomic, so every process reads and writes it without a lock; a
//! process that is killed or stuck in the kernel leaves it consistent.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

/// The categories calls are counted under, one KTAP test each: the three kinds of input every
/// command refuses before it looks at the range, one per command for the rest, and the probe
/// with the largest `npages`.
pub const CATEGORIES: [&str; 14] = [
    "unknown_commands",
    "bad_cmd_pointer",
    "bad_fields",
    "READ",
    "WRITE",
    "MIGRATE_TO_DEV",
    "MIGRATE_TO_SYS",
    "SNAPSHOT",
    "EXCLUSIVE",
    "CHECK_EXCLUSIVE",
    "RELEASE",
    "FLAGS",
    "READ_UNLOCKED",
    "huge_npages",
];
pub const CAT_UNKNOWN: usize = 0;
pub const CAT_BAD_POINTER: usize = 1;
pub const CAT_BAD_FIELDS: usize = 2;
/// The category of command number 0 (READ); command `nr` is `CAT_COMMAND + nr`.
pub const CAT_COMMAND: usize = 3;
pub const CAT_HUGE: usize = 13;

/// Results are counted by errno up to this one (index 0 is success); larger ones in the last.
pub const ERRNOS: usize = 136;

/// Threads and forked children that can be in a call at once, each with its slot.
pub const SLOTS: usize = 160;
/// The slot of a worker thread's forked child: the thread's slot plus this.
pub const CHILD_SLOTS: usize = 64;
/// The slot of the probe's child for device `n`: this plus `n`.
pub const PROBE_SLOTS: usize = 150;

/// Calls per RELEASE that may pass the argument checks.
pub const RELEASE_EVERY: u64 = 1000;

/// Violations kept as text (the rest are only counted).
pub const VIOLATIONS: usize = 32;
const TEXT: usize = 600;

/// The results of one category.
pub struct Category {
    pub calls: AtomicU64,
    /// Nanoseconds spent in the calls.
    pub ns: AtomicU64,
    /// Calls by result: index 0 success, else the errno.
    pub results: [AtomicU64; ERRNOS],
    /// Nanoseconds spent in the calls, by result.
    pub results_ns: [AtomicU64; ERRNOS],
    pub violations: AtomicU64,
}

/// One caller's call in progress (`since` 0: none).
pub struct Slot {
    /// `CLOCK_MONOTONIC` nanoseconds when the call began, 0 between calls.
    pub since: AtomicU64,
    pub pid: AtomicU64,
    pub dev: AtomicU64,
    pub req: AtomicU64,
    pub arg: AtomicU64,
    pub addr: AtomicU64,
    pub ptr: AtomicU64,
    pub npages: AtomicU64,
    /// Calls completed through this slot (the probe: its position in the work list).
    pub done: AtomicU64,
}

/// A line of text, written once.
pub struct Text {
    /// 0 while unwritten, else the length plus one.
    len: AtomicU64,
    category: AtomicU64,
    bytes: [AtomicU8; TEXT],
}

impl Text {
    /// Writes the text (cut to its room) and its category.
    fn put(&self, category: usize, s: &str) {
        let b = s.as_bytes();
        let n = b.len().min(TEXT);
        for (dst, &src) in self.bytes.iter().zip(&b[..n]) {
            dst.store(src, Ordering::Relaxed);
        }
        self.category.store(category as u64, Ordering::Relaxed);
        self.len.store(n as u64 + 1, Ordering::Release);
    }

    /// The category and text, once written.
    fn get(&self) -> Option<(usize, String)> {
        let n = self.len.load(Ordering::Acquire).checked_sub(1)? as usize;
        let b: Vec<u8> = self.bytes[..n]
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        Some((
            self.category.load(Ordering::Relaxed) as usize,
            String::from_utf8_lossy(&b).into_owned(),
        ))
    }
}

/// The worker's own checks at the end of the random phase.
pub struct Final {
    /// 0 not reached, 1 passed, 2 failed.
    pub arena: AtomicU64,
    pub arena_text: Text,
    /// Nanoseconds the random phase took in the worker, from the first call to the last.
    pub phase_ns: AtomicU64,
    /// Forks the worker made, and fd reopens.
    pub forks: AtomicU64,
    pub reopens: AtomicU64,
}

/// The whole shared mapping.
pub struct Shared {
    /// Calls completed, by every process.
    pub calls: AtomicU64,
    /// Set by the supervisor: workers stop at their next call.
    pub stop: AtomicBool,
    /// Commands (bit `nr`) whose largest `npages` did not return in the probe.
    pub hung: AtomicU64,
    /// RELEASE calls that passed the argument checks: one may per [`RELEASE_EVERY`] calls
    /// (each evicts and unregisters all of a device's memory, slow under TCG).
    pub releases: AtomicU64,
    pub categories: [Category; 14],
    /// Nanoseconds each call of the probe's current child took, by position.
    pub probe_ns: [AtomicU64; 64],
    pub slots: [Slot; SLOTS],
    nviolations: AtomicU64,
    violations: [Text; VIOLATIONS],
    pub fin: Final,
}

impl Shared {
    /// Maps a zeroed `Shared` that this process and every child it forks share.
    pub fn new() -> &'static Shared {
        let len = std::mem::size_of::<Shared>();
        // SAFETY: A fresh anonymous shared mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(p != libc::MAP_FAILED, "cannot map the shared state");
        // The mapping is `len` bytes, page-aligned and zero-filled, and never unmapped, so the
        // reference lives as long as the process (and its children).
        // SAFETY: `Shared` is atomics only, for which all-zero bytes are a valid value.
        unsafe { &*p.cast::<Shared>() }
    }

    /// Counts one call of `category` that took `ns` with result `errno` (0: success).
    pub fn record(&self, category: usize, errno: i32, ns: u64) {
        let c = &self.categories[category];
        c.calls.fetch_add(1, Ordering::Relaxed);
        c.ns.fetch_add(ns, Ordering::Relaxed);
        let i = (errno.max(0) as usize).min(ERRNOS - 1);
        c.results[i].fetch_add(1, Ordering::Relaxed);
        c.results_ns[i].fetch_add(ns, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a violation of `category`, and keeps its text if there is room.
    pub fn violation(&self, category: usize, text: &str) {
        self.categories[category]
            .violations
            .fetch_add(1, Ordering::Relaxed);
        let i = self.nviolations.fetch_add(1, Ordering::Relaxed) as usize;
        if let Some(v) = self.violations.get(i) {
            v.put(category, text);
        }
    }

    /// The kept violations of `category`.
    pub fn violations(&self, category: usize) -> Vec<String> {
        self.violations
            .iter()
            .filter_map(Text::get)
            .filter(|(c, _)| *c == category)
            .map(|(_, t)| t)
            .collect()
    }

    /// Records the worker's arena check.
    pub fn set_arena(&self, ok: bool, text: &str) {
        self.fin.arena_text.put(0, text);
        self.fin
            .arena
            .store(if ok { 1 } else { 2 }, Ordering::Release);
    }

    /// The worker's arena check: `None` if it never came.
    pub fn arena(&self) -> Option<(bool, String)> {
        match self.fin.arena.load(Ordering::Acquire) {
            0 => None,
            r => Some((
                r == 1,
                self.fin
                    .arena_text
                    .get()
                    .map(|(_, t)| t)
                    .unwrap_or_default(),
            )),
        }
    }
}

impl Slot {
    /// Marks a call as begun.
    #[expect(clippy::too_many_arguments)]
    pub fn begin(
        &self,
        dev: usize,
        req: u64,
        arg: u64,
        addr: u64,
        ptr: u64,
        npages: u64,
        pid: u32,
    ) {
        self.pid.store(u64::from(pid), Ordering::Relaxed);
        self.dev.store(dev as u64, Ordering::Relaxed);
        self.req.store(req, Ordering::Relaxed);
        self.arg.store(arg, Ordering::Relaxed);
        self.addr.store(addr, Ordering::Relaxed);
        self.ptr.store(ptr, Ordering::Relaxed);
        self.npages.store(npages, Ordering::Relaxed);
        self.since.store(now_ns().max(1), Ordering::Release);
    }

    /// Marks the call as done.
    pub fn end(&self) {
        self.since.store(0, Ordering::Release);
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Describes the call in progress, if it has run for `limit_ns` or more.
    pub fn stuck(&self, limit_ns: u64) -> Option<String> {
        let since = self.since.load(Ordering::Acquire);
        if since == 0 || now_ns().saturating_sub(since) < limit_ns {
            return None;
        }
        let req = self.req.load(Ordering::Relaxed);
        Some(format!(
            "pid {} in {} for {} s on hmm_dmirror{}: req {req:#x} cmd at {:#x}: addr {:#x} ptr {:#x} npages {:#x}",
            self.pid.load(Ordering::Relaxed),
            command_name(req),
            now_ns().saturating_sub(since) / 1_000_000_000,
            self.dev.load(Ordering::Relaxed),
            self.arg.load(Ordering::Relaxed),
            self.addr.load(Ordering::Relaxed),
            self.ptr.load(Ordering::Relaxed),
            self.npages.load(Ordering::Relaxed),
        ))
    }
}

/// The name of an ioctl request (by its low 32 bits, as the kernel sees it).
pub fn command_name(req: u64) -> &'static str {
    dmirror_abi::uapi::command_name(req).unwrap_or("an unknown command")
}

/// `CLOCK_MONOTONIC` in nanoseconds, the same clock in every process.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid `timespec` to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The name of an errno, for the report.
pub fn errno_name(e: i32) -> String {
    let n = match e {
        0 => "ok",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHWPOISON => "EHWPOISON",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}
