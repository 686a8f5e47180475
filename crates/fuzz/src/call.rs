//! One fuzzed call: how it is made up, what the driver may answer, and the checks of what it
//! did.
//!
//! # The contract checked
//!
//! The driver's contract is written on the commands of [`dmirror_abi::uapi`]. Before it looks
//! at anything else, the driver refuses a request that is not one of its ten (`ENOTTY`,
//! whatever the argument), a command block it cannot read (`EFAULT`), and a range that is
//! empty, not page-aligned or wraps around the address space, `npages * 4096` included
//! (`EINVAL`). Those answers are checked exactly.
//!
//! Past them, each command's answer depends on what the range holds, page by page up to the
//! first unmapped one ([`Arena::path`]), and on whether `ptr` has room for what the command
//! copies: see [`Caller::command`]. Success is allowed only where nothing in the range or the
//! buffer forbids it; some errors are always allowed where the fuzzer's own concurrency can
//! cause them (`EBUSY` after the driver's one-second retry limit, `ENOENT` when pages did not
//! all reach the device, `ENOMEM` when the FLAGS fail-allocation bit is set, `EBADF` when
//! another thread closed the descriptor meanwhile).
//!
//! After a success the outputs must make sense (`cpages`, `faults` computed, not the garbage
//! passed in), data read from a checked region must be that region's data, and a SNAPSHOT
//! must have written a valid byte for every page; after a failure the command block must be
//! as it was.

use crate::arena::{cmd_bytes, cmd_from, Arena, Kind, Region, CMD_BLOCKS};
use crate::shared::{
    errno_name, now_ns, Shared, CAT_BAD_FIELDS, CAT_BAD_POINTER, CAT_COMMAND, CAT_UNKNOWN,
    RELEASE_EVERY,
};
use dmirror_abi::uapi::nr::{
    CHECK_EXCLUSIVE, EXCLUSIVE, MIGRATE_TO_DEV, MIGRATE_TO_SYS, READ, READ_UNLOCKED, RELEASE,
    SNAPSHOT, WRITE,
};
use dmirror_abi::uapi::{ioc, iowr, valid_prot, Cmd, COMMANDS, PAGE, PROT_ERROR};
use dmirror_suite::hmm::Rng;
use std::sync::atomic::Ordering;

/// Bit 0: success; bit `e`: errno `e`.
pub type Allowed = u128;
pub const OK: Allowed = 1;

/// The bit of errno `e` (0: success) in an [`Allowed`] set.
pub const fn bit(e: i32) -> Allowed {
    1 << e
}

/// `npages` at most, in the random phase, for a command that hung with the largest one.
pub const HUNG_CAP: u64 = 1 << 16;

/// The end of the address range any process here maps (47 bits).
const USER_END: u64 = 0x8000_0000_0000;
/// An address in the kernel's direct map.
pub const KERNEL: u64 = 0xffff_8880_0000_0000;
/// The byte the buffers of checked copy-outs are filled with first.
const POISON: u8 = 0xa5;

/// The command number of a request, if it is one of the ten (the kernel sees 32 bits).
pub fn known(req: u64) -> Option<u64> {
    (0..10).find(|&nr| iowr(nr) == req & 0xffff_ffff)
}

/// Whether the driver's argument checks pass: a non-empty, page-aligned range that does not
/// wrap around, `npages * 4096` included.
pub fn checks_pass(c: &Cmd) -> bool {
    c.npages
        .checked_mul(PAGE as u64)
        .and_then(|len| c.addr.checked_add(len))
        .is_some()
        && c.npages != 0
        && c.addr.is_multiple_of(PAGE as u64)
}

/// The largest `npages` whose range from `addr` does not wrap.
pub fn max_npages(addr: u64) -> u64 {
    ((u64::MAX - addr) / PAGE as u64).min(u64::MAX / PAGE as u64)
}

/// Bytes of `ptr` the command copies to or from: `None` for commands that do not use it.
pub fn need(nr: u64, npages: u64) -> Option<u64> {
    match nr {
        READ | WRITE | MIGRATE_TO_DEV | EXCLUSIVE | READ_UNLOCKED => {
            Some(npages.saturating_mul(PAGE as u64))
        }
        SNAPSHOT => Some(npages),
        _ => None,
    }
}

/// Where the command block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdAt {
    /// On the caller's stack.
    Stack,
    /// On the stack, this many bytes off alignment.
    Unaligned(usize),
    Null,
    /// In a hole of the arena.
    Hole,
    /// At a kernel address.
    Kernel,
    /// At a non-canonical (or never-mapped upper user) address.
    NonCanonical,
    /// In the `PROT_NONE` mapping.
    ProtNone,
    /// Its first bytes at the end of the caller's scratch buffer, the rest in the hole after.
    Straddle,
    /// Prepared block `i` of the read-only page: readable, not writable.
    ReadOnly(usize),
}

impl CmdAt {
    /// Whether the kernel can read the 40 bytes of the block.
    fn readable(self) -> bool {
        matches!(
            self,
            CmdAt::Stack | CmdAt::Unaligned(_) | CmdAt::ReadOnly(_)
        )
    }
}

/// One call.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    /// The device node.
    pub dev: usize,
    /// The request as passed (upper bits may be set: the kernel ignores them).
    pub req: u64,
    pub at: CmdAt,
    pub cmd: Cmd,
}

/// What a call returned.
pub struct Outcome {
    /// 0 or the errno.
    pub errno: i32,
    /// A return value other than 0 or -1.
    pub odd_return: Option<i32>,
    /// The command block after the call, where the fuzzer owns it.
    pub after: Option<Cmd>,
    /// How long the call took.
    pub ns: u64,
}

/// Makes calls for one thread (or a forked child of it) and checks them.
pub struct Caller<'a> {
    pub arena: &'a Arena,
    pub shared: &'static Shared,
    pub rng: Rng,
    /// The thread's number: its scratch buffer.
    pub thread: usize,
    /// Its watchdog slot.
    pub slot: usize,
    pub threads: usize,
    /// The device nodes that exist.
    pub devices: &'a [usize],
    pub seed: u64,
    pub child: bool,
    /// Calls made.
    pub made: u64,
    /// The process's mappings once every thread ran: see [`Caller::reaches_out`].
    pub maps: &'a [(u64, u64, String)],
}

impl Caller<'_> {
    /// The thread's own scratch buffer.
    fn scratch(&self) -> &Region {
        self.arena.region(Kind::Scratch(self.thread))
    }

    /// One of `from`, at random.
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.below(from.len() as u64) as usize]
    }

    /// A page-aligned address in a random hole of the arena.
    fn hole_addr(&mut self) -> u64 {
        let h = self.arena.holes[self.rng.below(self.arena.holes.len() as u64) as usize];
        h.start + self.rng.below(h.len / PAGE as u64) * PAGE as u64
    }

    /// A new random call.
    pub fn gen(&mut self) -> Call {
        let dev = self.pick(self.devices);
        let r = self.rng.below(100);
        if r < 8 {
            let nr = self.rng.below(10);
            let at = self.any_cmd_at();
            let cmd = self.fields(nr);
            return Call {
                dev,
                req: self.unknown_request(),
                at,
                cmd,
            };
        }
        let nr = self.rng.below(10);
        let mut req = iowr(nr);
        if self.rng.below(20) == 0 {
            // Only 32 bits reach the driver.
            req |= self.rng.next() << 32;
        }
        let (at, cmd) = if r < 13 {
            let at = self.pick(&[
                CmdAt::Null,
                CmdAt::Hole,
                CmdAt::Kernel,
                CmdAt::NonCanonical,
                CmdAt::ProtNone,
                CmdAt::Straddle,
            ]);
            (at, self.fields(nr))
        } else if r < 15 {
            let mut i = self.rng.below(CMD_BLOCKS as u64) as usize;
            if nr == RELEASE && checks_pass(&self.arena.command_block(i).1) && !self.take_release()
            {
                // Block 3 has no pages: RELEASE refuses it before evicting anything.
                i = 3;
            }
            (CmdAt::ReadOnly(i), self.arena.command_block(i).1)
        } else if r < 24 {
            (
                CmdAt::Unaligned(1 + self.rng.below(7) as usize),
                self.fields(nr),
            )
        } else {
            (CmdAt::Stack, self.fields(nr))
        };
        Call { dev, req, at, cmd }
    }

    /// A request that is none of the ten: another type, number, size or direction, or any
    /// 32 bits, but not one the VFS handles itself for every file (`FIONREAD`, `FIFREEZE`,
    /// `FS_IOC_*`, `FICLONE`, ...).
    fn unknown_request(&mut self) -> u64 {
        loop {
            let nr = self.rng.below(10);
            let size = 40;
            let r = match self.rng.below(5) {
                0 => ioc(3, self.rng.below(256), nr, size),
                1 => ioc(3, u64::from(b'H'), 10 + self.rng.below(246), size),
                2 => ioc(3, u64::from(b'H'), nr, self.rng.below(1 << 14)),
                3 => ioc(self.rng.below(3), u64::from(b'H'), nr, size),
                _ => self.rng.next() & 0xffff_ffff,
            };
            let ty = (r >> 8) & 0xff;
            if known(r).is_none() && !matches!(ty, 0x00 | 0x15 | 0x54 | 0x58 | 0x66 | 0x94) {
                return r;
            }
        }
    }

    /// Any place for a command block, readable or not.
    fn any_cmd_at(&mut self) -> CmdAt {
        match self.rng.below(9) {
            0 => CmdAt::Stack,
            1 => CmdAt::Unaligned(1 + self.rng.below(7) as usize),
            2 => CmdAt::Null,
            3 => CmdAt::Hole,
            4 => CmdAt::Kernel,
            5 => CmdAt::NonCanonical,
            6 => CmdAt::ProtNone,
            7 => CmdAt::Straddle,
            _ => CmdAt::ReadOnly(self.rng.below(CMD_BLOCKS as u64) as usize),
        }
    }

    /// Takes the RELEASE that may pass the checks now, if it is due.
    fn take_release(&self) -> bool {
        let due = self.shared.calls.load(Ordering::Relaxed) / RELEASE_EVERY + 1;
        self.shared
            .releases
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < due).then_some(n + 1)
            })
            .is_ok()
    }

    /// Random fields for command `nr`.
    fn fields(&mut self, nr: u64) -> Cmd {
        let addr = self.gen_addr(nr);
        let npages = self.gen_npages(nr, addr);
        let ptr = self.gen_ptr(nr, addr, npages);
        let mut c = Cmd {
            addr,
            ptr,
            npages,
            cpages: self.garbage(),
            faults: self.garbage(),
        };
        if nr == RELEASE && checks_pass(&c) && !self.take_release() {
            c.npages = 0;
        }
        c
    }

    /// What goes into the output-only fields: the driver must ignore it.
    fn garbage(&mut self) -> u64 {
        match self.rng.below(4) {
            0 => 0,
            1 => u64::MAX,
            _ => self.rng.next(),
        }
    }

    /// An address for command `nr`: in the arena or unmapped, now and then unaligned.
    fn gen_addr(&mut self, nr: u64) -> u64 {
        let aligned = if self.rng.below(100) < 78 {
            self.arena_addr(nr)
        } else {
            self.unmapped_addr()
        };
        match self.rng.below(100) {
            0..=3 => aligned.wrapping_add(1 + self.rng.below(PAGE as u64 - 1)),
            4 => aligned.wrapping_add(PAGE as u64 / 2),
            _ => aligned,
        }
    }

    /// A page of the arena: of a random kind, anywhere in its region, at its start or among
    /// its last pages (so that ranges run into the hole after it).
    fn arena_addr(&mut self, nr: u64) -> u64 {
        const WEIGHTS: [(Kind, u64); 10] = [
            (Kind::Thp, 12),
            (Kind::Anon, 14),
            (Kind::Pattern, 14),
            (Kind::ReadOnly, 8),
            (Kind::ProtNone, 6),
            (Kind::File, 7),
            (Kind::DevMap, 6),
            (Kind::Churn, 8),
            (Kind::Scratch(0), 10),
            (Kind::Hole, 8),
        ];
        let mut w = self.rng.below(WEIGHTS.iter().map(|k| k.1).sum());
        let mut kind = Kind::Anon;
        for (k, n) in WEIGHTS {
            if w < n {
                kind = k;
                break;
            }
            w -= n;
        }
        let region = match kind {
            Kind::Hole => return self.hole_addr(),
            // Only the thread's own buffer takes WRITEs: the others are other threads' data.
            Kind::Scratch(_) if nr == WRITE || self.rng.below(10) < 7 => *self.scratch(),
            Kind::Scratch(_) => {
                let t = self.rng.below(self.threads as u64) as usize;
                *self.arena.region(Kind::Scratch(t))
            }
            k => *self.arena.region(k),
        };
        let pages = region.pages();
        let page = match self.rng.below(10) {
            0..=5 => self.rng.below(pages),
            6 | 7 => 0,
            _ => pages - 1 - self.rng.below(pages.min(4)),
        };
        region.start + page * PAGE as u64
    }

    /// A page nothing maps: 0, below 64 KiB, the last page under 47 bits (above the stack),
    /// above 47 bits, the kernel's direct map, the vsyscall page, the top of the address
    /// space, any page of the upper half.
    fn unmapped_addr(&mut self) -> u64 {
        match self.rng.below(8) {
            0 => 0,
            1 => self.rng.below(16) * PAGE as u64,
            2 => USER_END - PAGE as u64,
            3 => USER_END + self.rng.below(1 << 30) * PAGE as u64,
            4 => KERNEL + self.rng.below(1 << 20) * PAGE as u64,
            5 => 0xffff_ffff_ff60_0000,
            6 => 0xffff_ffff_ffff_f000 - self.rng.below(16) * PAGE as u64,
            _ => (self.rng.next() | 1 << 63) & !(PAGE as u64 - 1),
        }
    }

    /// A page count for command `nr` at `addr`: 0, 1, small, to the end of the region or
    /// past it, huge, overflowing, or any 64 bits.
    fn gen_npages(&mut self, nr: u64, addr: u64) -> u64 {
        let page = addr & !(PAGE as u64 - 1);
        let remaining = self
            .arena
            .region_at(page)
            .map(|r| (r.end() - page) / PAGE as u64);
        let max = max_npages(addr);
        // Ranges over most of a large region are slow under TCG: they come rarely.
        let small = |r: u64, rng: &mut Rng| r <= 32 || rng.below(8) == 0;
        let big_region = remaining.is_some_and(|r| r > 32);
        let n = match self.rng.below(100) {
            0..=3 => 0,
            4..=31 => 1,
            32..=64 => 2 + self.rng.below(15),
            65..=72 => match remaining {
                Some(r) if small(r, &mut self.rng) => r,
                _ => 1 + self.rng.below(16),
            },
            73..=78 => match remaining {
                Some(r) if small(r, &mut self.rng) => r + 1 + self.rng.below(8),
                Some(_) => 1 + self.rng.below(16),
                None => 1 + self.rng.below(8),
            },
            79..=86 if big_region && self.rng.below(8) != 0 => 1 + self.rng.below(16),
            79..=86 => {
                let huge = [1 << 16, 1 << 20, 1 << 32, 1 << 40, max];
                huge[self.rng.below(5) as usize].min(max)
            }
            87..=93 => match self.rng.below(5) {
                0 => 1 << 52,
                1 => (1 << 52) + self.rng.below(1 << 40),
                2 => u64::MAX,
                3 => max + 1 + self.rng.below(4),
                _ => self.rng.next() | 1 << 63,
            },
            _ => {
                if self.rng.below(2) == 0 {
                    self.rng.next()
                } else {
                    self.rng.below(1 << 20)
                }
            }
        };
        let hung = self.shared.hung.load(Ordering::Relaxed) & (1 << nr) != 0;
        if hung && n > HUNG_CAP && n <= max {
            1 + self.rng.below(HUNG_CAP)
        } else {
            n
        }
    }

    /// An address the kernel cannot use as a buffer.
    fn bad_ptr(&mut self) -> u64 {
        match self.rng.below(5) {
            0 => 0,
            1 => self.hole_addr() + self.rng.below(64) * 8,
            2 => KERNEL + self.rng.below(1 << 20) * 8,
            3 => 0xdead_0000_0000_0000 + self.rng.below(1 << 20) * 8,
            _ => self.arena.region(Kind::ProtNone).start,
        }
    }

    /// A buffer for command `nr`: the thread's scratch buffer with room or short of it,
    /// unaligned, the file, the device mapping, read-only memory, or an address the kernel
    /// cannot use.
    fn gen_ptr(&mut self, nr: u64, addr: u64, npages: u64) -> u64 {
        let s = *self.scratch();
        if nr == WRITE {
            // A WRITE into a checked region takes the data it already holds, from its mirror.
            if let Some(r) = self.arena.region_at(addr) {
                let mirror = match r.kind {
                    Kind::Pattern => Some(Kind::MirrorPattern),
                    Kind::Thp => Some(Kind::MirrorThp),
                    _ => None,
                };
                if let Some(m) = mirror {
                    return if self.rng.below(5) == 0 {
                        self.bad_ptr()
                    } else {
                        self.arena.region(m).start + (addr - r.start)
                    };
                }
            }
        }
        let Some(need) = need(nr, npages) else {
            return match self.rng.below(4) {
                0 => 0,
                1 => s.start,
                2 => self.rng.next(),
                _ => self.bad_ptr(),
            };
        };
        if need > s.len {
            // Huge: bad, or a little room at the end of the buffer, so that the command
            // fails after a few windows rather than after the whole buffer.
            return if self.rng.below(2) == 0 {
                self.bad_ptr()
            } else {
                s.end() - 64 * (1 + self.rng.below(16))
            };
        }
        match self.rng.below(100) {
            0..=61 => s.start + self.rng.below((s.len - need) / PAGE as u64 + 1) * PAGE as u64,
            62..=67 => s.end() - need,
            68..=72 if need + PAGE as u64 <= s.len => s.start + 1 + self.rng.below(PAGE as u64 - 1),
            73..=76 => {
                let k = self.pick(&[Kind::DevMap, Kind::File]);
                self.arena.region(k).start
            }
            77..=79 => self.arena.region(Kind::ReadOnly).start,
            80..=85 => s.end().saturating_sub(need / 2).max(s.start),
            _ => self.bad_ptr(),
        }
    }

    /// The address of a command block that is not the caller's own.
    fn cmd_address(&mut self, at: CmdAt) -> u64 {
        match at {
            CmdAt::Stack | CmdAt::Unaligned(_) | CmdAt::Null => 0,
            CmdAt::Hole => {
                let h = self.arena.holes[self.rng.below(self.arena.holes.len() as u64) as usize];
                h.start + self.rng.below((h.len - 40) / 8) * 8
            }
            CmdAt::Kernel => KERNEL + self.rng.below(1 << 20) * 8,
            CmdAt::NonCanonical => {
                if self.rng.below(2) == 0 {
                    0xdead_0000_0000_0000 + self.rng.below(1 << 20) * 8
                } else {
                    USER_END + self.rng.below(1 << 20) * 8
                }
            }
            CmdAt::ProtNone => self.arena.region(Kind::ProtNone).start + self.rng.below(500) * 8,
            CmdAt::Straddle => self.scratch().end() - 8 * (1 + self.rng.below(4)),
            CmdAt::ReadOnly(i) => self.arena.command_block(i).0,
        }
    }

    /// A safety net: whether a command that walks its range page by page would reach a
    /// mapping outside the arena (which the generator must never produce). Such a call is
    /// counted as a violation and not made.
    pub fn reaches_out(&self, call: &Call) -> bool {
        let c = &call.cmd;
        let walks = matches!(
            known(call.req),
            Some(READ | WRITE | MIGRATE_TO_DEV | MIGRATE_TO_SYS | EXCLUSIVE | READ_UNLOCKED)
        );
        if !walks || !call.at.readable() || !checks_pass(c) {
            return false;
        }
        let Some(line) = self
            .arena
            .foreign(self.maps, c.addr, c.addr + c.npages * PAGE as u64)
        else {
            return false;
        };
        let (category, _) = self.expect(call);
        self.shared.violation(
            category,
            &format!(
                "{}: not made, the range reaches a mapping outside the arena: {line}",
                self.describe(call)
            ),
        );
        true
    }

    /// Makes the call on `fd`.
    pub fn issue(&mut self, fd: i32, call: &Call) -> Outcome {
        #[repr(align(8))]
        struct Block([u8; 64]);
        let mut block = Block([0; 64]);
        let own = match call.at {
            CmdAt::Stack => Some(0),
            CmdAt::Unaligned(k) => Some(k),
            _ => None,
        };
        let arg = match own {
            Some(off) => {
                block.0[off..off + 40].copy_from_slice(&cmd_bytes(&call.cmd));
                block.0.as_mut_ptr() as u64 + off as u64
            }
            None => self.cmd_address(call.at),
        };
        // SNAPSHOT into the thread's own buffer: poison it first, to see every byte written.
        let c = &call.cmd;
        if known(call.req) == Some(SNAPSHOT) && self.owns(c.ptr, c.npages) {
            // The buffer is mapped read-write and no other thread writes it.
            // SAFETY: `[ptr, ptr + npages)` is inside this thread's scratch buffer.
            unsafe { std::ptr::write_bytes(c.ptr as *mut u8, POISON, c.npages as usize) };
        }
        let slot = &self.shared.slots[self.slot];
        slot.begin(
            call.dev,
            call.req,
            arg,
            c.addr,
            c.ptr,
            c.npages,
            std::process::id(),
        );
        let started = now_ns();
        // The driver reads and writes the 40 bytes at `arg`, which are either the block above
        // or an address it must refuse (`EFAULT`); and the user memory the fields name, which
        // the arena limits to memory whose contents the fuzzer gives away (the scratch
        // buffers, the free regions) or keeps (a WRITE into a checked region copies its own
        // data back), each region ending at a hole that stops every command.
        // SAFETY: So the call touches no memory this process relies on.
        let r = unsafe { libc::ioctl(fd, call.req as libc::c_ulong, arg as *mut libc::c_void) };
        let errno = if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        };
        let ns = now_ns() - started;
        slot.end();
        self.made += 1;
        Outcome {
            errno,
            odd_return: (r != 0 && r != -1).then_some(r),
            after: own.map(|off| cmd_from(&block.0[off..off + 40])),
            ns,
        }
    }

    /// Whether `[ptr, ptr + len)` lies in this thread's scratch buffer.
    fn owns(&self, ptr: u64, len: u64) -> bool {
        let s = self.scratch();
        ptr >= s.start && len <= s.len && ptr - s.start <= s.len - len
    }

    /// The category of a call and what it may return.
    pub fn expect(&self, call: &Call) -> (usize, Allowed) {
        let Some(nr) = known(call.req) else {
            return (CAT_UNKNOWN, bit(libc::ENOTTY));
        };
        if !call.at.readable() {
            return (CAT_BAD_POINTER, bit(libc::EFAULT));
        }
        if !checks_pass(&call.cmd) {
            return (CAT_BAD_FIELDS, bit(libc::EINVAL));
        }
        let mut a = self.command(nr, &call.cmd);
        if let CmdAt::ReadOnly(_) = call.at {
            // It runs, then the result cannot be written back.
            a = (a & !OK) | bit(libc::EFAULT);
        }
        (CAT_COMMAND + nr as usize, a)
    }

    /// What command `nr` may return for a range that passed the checks.
    pub fn command(&self, nr: u64, c: &Cmd) -> Allowed {
        use libc::{EBUSY, EFAULT, EINVAL, ENOENT, ENOMEM, EOPNOTSUPP, EPERM};
        let end = c.addr + c.npages * PAGE as u64;
        let path = self.arena.path(c.addr, end);
        let has = |k: Kind| path.contains(&k);
        let (hole, prot_none, churn) = (has(Kind::Hole), has(Kind::ProtNone), has(Kind::Churn));
        let mapped = path.iter().any(|&k| k != Kind::Hole);
        let ptr_ok = need(nr, c.npages).is_none_or(|n| self.arena.room(c.ptr, nr != WRITE) >= n);
        let mut a = 0;
        let mut when = |cond: bool, what: Allowed| {
            if cond {
                a |= what;
            }
        };
        match nr {
            READ | READ_UNLOCKED => {
                when(!hole && !prot_none && ptr_ok, OK);
                when(hole || prot_none || churn || !ptr_ok, bit(EFAULT));
                when(mapped, bit(EBUSY));
            }
            WRITE => {
                let ro = has(Kind::ReadOnly);
                when(!hole && !prot_none && !ro && ptr_ok, OK);
                when(hole || prot_none || churn || !ptr_ok, bit(EFAULT));
                when(ro, bit(EPERM));
                when(mapped, bit(EBUSY));
            }
            MIGRATE_TO_DEV => {
                let special = has(Kind::DevMap);
                // A file page is never migrated, and the migration drops the range's mirror
                // entries of system pages before it reads the range back; but another thread's
                // READ or WRITE through the same (shared) descriptor can mirror the file page
                // again in between, and the read-back then finds every page.
                let file_ok = !has(Kind::File) || self.threads > 1;
                when(!hole && !prot_none && !special && file_ok && ptr_ok, OK);
                when(hole || prot_none || special || churn, bit(EINVAL));
                when(mapped, bit(ENOENT) | bit(ENOMEM));
                when(!ptr_ok, bit(EFAULT));
            }
            MIGRATE_TO_SYS => {
                let special = has(Kind::DevMap);
                when(!hole && !prot_none && !special, OK);
                when(hole || prot_none || special || churn, bit(EINVAL));
                when(mapped, bit(ENOMEM));
            }
            SNAPSHOT => {
                when(ptr_ok, OK);
                when(!ptr_ok, bit(EFAULT));
                when(c.addr < USER_END, bit(EBUSY));
            }
            EXCLUSIVE => {
                let anon = path.iter().all(|&k| exclusive_able(k));
                when(anon && ptr_ok, OK);
                when(
                    hole || prot_none || has(Kind::ReadOnly) || churn || !ptr_ok,
                    bit(EFAULT),
                );
                when(has(Kind::File) || has(Kind::DevMap), bit(EOPNOTSUPP));
                when(mapped, bit(ENOENT) | bit(EBUSY));
            }
            CHECK_EXCLUSIVE => {
                when(true, OK);
                when(self.arena.overlaps(c.addr, end, exclusive_able), bit(EPERM));
            }
            _ => when(true, OK),
        }
        a
    }

    /// Checks a call's outcome; records it and any violation.
    pub fn check(&mut self, call: &Call, out: &Outcome, closed_meanwhile: bool) {
        let (category, mut allowed) = self.expect(call);
        if closed_meanwhile {
            allowed |= bit(libc::EBADF);
        }
        self.shared.record(category, out.errno, out.ns);
        let mut problems = Vec::new();
        if let Some(r) = out.odd_return {
            problems.push(format!("returned {r}"));
        }
        if allowed & bit(out.errno) == 0 {
            problems.push(format!(
                "got {}, allowed {}",
                errno_name(out.errno),
                allowed_names(allowed)
            ));
        }
        let c = &call.cmd;
        if let (Some(after), Some(nr)) = (out.after, known(call.req)) {
            if out.errno != 0 {
                if cmd_bytes(&after) != cmd_bytes(c) {
                    problems.push(format!(
                        "a failed call changed the command block: {after:x?}"
                    ));
                }
            } else if let Some(p) = outputs_wrong(nr, c, &after) {
                problems.push(p);
            }
        }
        if out.errno == 0 {
            if let Some(p) = self.data_wrong(call) {
                problems.push(p);
            }
        }
        if !problems.is_empty() {
            let text = format!("{}: {}", self.describe(call), problems.join("; "));
            self.shared.violation(category, &text);
        }
    }

    /// Checks what a successful call copied into the thread's own buffer.
    fn data_wrong(&self, call: &Call) -> Option<String> {
        let c = &call.cmd;
        let nr = known(call.req)?;
        match nr {
            READ | READ_UNLOCKED | MIGRATE_TO_DEV | EXCLUSIVE => {
                let len = c.npages * PAGE as u64;
                if !self.owns(c.ptr, len) {
                    return None;
                }
                let want = self.arena.expected(c.addr, len)?;
                // SAFETY: The range is inside this thread's own scratch buffer.
                let got = unsafe { std::slice::from_raw_parts(c.ptr as *const u8, len as usize) };
                let at = got.iter().zip(want).position(|(a, b)| a != b)?;
                Some(format!(
                    "the data copied out differs from the region's at byte {at} (page {})",
                    at / PAGE
                ))
            }
            SNAPSHOT => {
                if !self.owns(c.ptr, c.npages) {
                    return None;
                }
                let (ptr, len) = (c.ptr as *const u8, c.npages as usize);
                // SAFETY: As above.
                let got = unsafe { std::slice::from_raw_parts(ptr, len) };
                for (i, &b) in got.iter().enumerate() {
                    let page = c.addr + i as u64 * PAGE as u64;
                    let kind = self.arena.kind_at(page);
                    let unmapped =
                        kind == Kind::ProtNone || (kind == Kind::Hole && self.known_unmapped(page));
                    let mapped = !matches!(kind, Kind::Hole | Kind::Churn | Kind::ProtNone);
                    if !valid_prot(b)
                        || (unmapped && b != PROT_ERROR)
                        || (mapped && b == PROT_ERROR)
                    {
                        return Some(format!(
                            "SNAPSHOT byte {i} is {b:#x} for a page of {}",
                            kind.name()
                        ));
                    }
                }
                None
            }
            _ => None,
        }
    }

    /// Whether nothing is mapped at `page`, an address the arena does not map: one of its
    /// holes, or an address no process here maps.
    fn known_unmapped(&self, page: u64) -> bool {
        self.arena.holes.iter().any(|h| h.contains(page))
            || page < 0x10000
            || page >= USER_END - PAGE as u64
    }

    /// The call, for a report.
    fn describe(&self, call: &Call) -> String {
        let c = &call.cmd;
        let path: Vec<String> = if checks_pass(c) {
            self.arena
                .path(c.addr, c.addr + c.npages * PAGE as u64)
                .iter()
                .map(|k| k.name())
                .collect()
        } else {
            vec![self.arena.kind_at(c.addr).name()]
        };
        format!(
            "{} on hmm_dmirror{} ({} {}, call {}): req {:#x}, cmd {:?}, addr {:#x} [{}] ptr {:#x} [{}] npages {:#x} cpages {:#x} faults {:#x} (seed {})",
            crate::shared::command_name(call.req),
            call.dev,
            if self.child { "child of thread" } else { "thread" },
            self.thread,
            self.made,
            call.req,
            call.at,
            c.addr,
            path.join(" "),
            c.ptr,
            self.arena.kind_at(c.ptr).name(),
            c.npages,
            c.cpages,
            c.faults,
            self.seed
        )
    }
}

/// Kinds where EXCLUSIVE can succeed: writable private anonymous memory.
fn exclusive_able(k: Kind) -> bool {
    matches!(
        k,
        Kind::Thp | Kind::Anon | Kind::Pattern | Kind::Scratch(_) | Kind::Churn
    )
}

/// What is wrong with the outputs of a successful call, if anything: the inputs must come
/// back unchanged, `cpages` and `faults` must be computed (the garbage passed in ignored).
fn outputs_wrong(nr: u64, c: &Cmd, after: &Cmd) -> Option<String> {
    let (cp, f) = (after.cpages, after.faults);
    let ok = after.addr == c.addr
        && after.ptr == c.ptr
        && after.npages == c.npages
        && match nr {
            READ | WRITE | READ_UNLOCKED => cp == c.npages && f < 1 << 32,
            MIGRATE_TO_DEV | SNAPSHOT | EXCLUSIVE => cp == c.npages && f == 0,
            MIGRATE_TO_SYS => cp <= c.npages && f == 0,
            _ => cp == 0 && f == 0,
        };
    (!ok).then(|| format!("outputs wrong: {after:x?}"))
}

/// The names in an allowed set.
pub fn allowed_names(a: Allowed) -> String {
    let v: Vec<String> = (0..128)
        .filter(|&e| a & bit(e) != 0)
        .map(errno_name)
        .collect();
    format!("{{{}}}", v.join(", "))
}

/// The KTAP name of a command number.
pub fn name(nr: u64) -> &'static str {
    COMMANDS[nr as usize].1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file to map as the device mapping on the host.
    fn devzero() -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/zero")
            .expect("/dev/zero")
    }

    #[test]
    fn argument_checks() {
        let c = |addr, npages| Cmd {
            addr,
            npages,
            ..Cmd::default()
        };
        assert!(checks_pass(&c(0x1000, 1)));
        assert!(checks_pass(&c(0, max_npages(0))));
        assert!(!checks_pass(&c(0, max_npages(0) + 1)));
        assert!(!checks_pass(&c(0x1000, 0)));
        assert!(!checks_pass(&c(0x1001, 1)));
        assert!(!checks_pass(&c(0, 1 << 52)));
        assert!(!checks_pass(&c(0xffff_ffff_ffff_f000, 1)));
        assert!(checks_pass(&c(0xffff_ffff_ffff_e000, 1)));
        assert_eq!(known(iowr(4) | 0xdead_beef << 32), Some(4));
        assert_eq!(known(iowr(10)), None);
    }

    #[test]
    fn arena_paths_stop_at_holes() {
        let a = Arena::new(2, 7, &devzero());
        let p = *a.region(Kind::Pattern);
        assert_eq!(a.path(p.start, p.end()), vec![Kind::Pattern]);
        assert_eq!(
            a.path(p.start, p.end() + 1),
            vec![Kind::Pattern, Kind::Hole]
        );
        assert_eq!(a.path(p.end(), u64::MAX), vec![Kind::Hole]);
        assert_eq!(a.path(0, u64::MAX), vec![Kind::Hole]);
        for r in &a.regions {
            assert_eq!(
                a.kind_at(r.end()),
                Kind::Hole,
                "{:?} ends at a hole",
                r.kind
            );
        }
        let s = *a.region(Kind::Scratch(1));
        assert_eq!(a.room(s.start, true), s.len);
        assert_eq!(a.room(a.region(Kind::ReadOnly).start, true), 0);
        assert_eq!(
            a.room(a.region(Kind::ReadOnly).start, false),
            16 * PAGE as u64
        );
        // (Whether the holes stay empty depends on the other threads of the process: the guest
        // checks it at run time.)
        assert!(a.verify().is_empty());
        assert_eq!(
            a.expected(p.start, 16),
            a.expected(a.region(Kind::MirrorPattern).start, 16)
        );
    }

    /// The generator never lets the kernel write into memory the fuzzer checks or another
    /// thread owns, whatever the driver does with the call.
    #[test]
    fn calls_keep_checked_memory_safe() {
        let a = Arena::new(3, 11, &devzero());
        let shared = Shared::new();
        let devices = [0, 1, 2, 3];
        let mut c = Caller {
            arena: &a,
            shared,
            rng: Rng::new(5),
            thread: 1,
            slot: 1,
            threads: 3,
            devices: &devices,
            seed: 5,
            child: false,
            made: 0,
            maps: &[],
        };
        let mut kinds = std::collections::HashSet::new();
        for _ in 0..200_000 {
            let call = c.gen();
            let Some(nr) = known(call.req) else { continue };
            let cmd = call.cmd;
            if !checks_pass(&cmd) {
                continue;
            }
            let (cat, allowed) = c.expect(&call);
            assert!(allowed != 0, "{call:?}");
            kinds.insert((cat, allowed));
            let len = need(nr, cmd.npages).unwrap_or(0);
            let writes_ptr = matches!(
                nr,
                READ | SNAPSHOT | MIGRATE_TO_DEV | EXCLUSIVE | READ_UNLOCKED
            );
            if writes_ptr && a.room(cmd.ptr, true) > 0 {
                let k = a.kind_at(cmd.ptr);
                assert!(
                    matches!(k, Kind::Scratch(1) | Kind::File | Kind::DevMap),
                    "{} writes {len} bytes into {k:?}: {call:?}",
                    name(nr)
                );
            }
            if nr == WRITE {
                let k = a.kind_at(cmd.addr);
                assert!(!matches!(k, Kind::Scratch(t) if t != 1), "{call:?}");
                if let Some(r) = a
                    .region_at(cmd.addr)
                    .filter(|r| matches!(r.kind, Kind::Pattern | Kind::Thp))
                {
                    let m = a.region(if r.kind == Kind::Pattern {
                        Kind::MirrorPattern
                    } else {
                        Kind::MirrorThp
                    });
                    assert!(
                        cmd.ptr == m.start + (cmd.addr - r.start) || a.room(cmd.ptr, false) == 0,
                        "{call:?}"
                    );
                }
                assert!(!matches!(
                    a.kind_at(cmd.addr),
                    Kind::MirrorPattern | Kind::MirrorThp | Kind::CmdReadOnly
                ));
            }
        }
        // Every command gets both successes and failures to expect.
        for nr in 0..10 {
            let cat = CAT_COMMAND + nr;
            assert!(
                kinds.iter().any(|&(c, a)| c == cat && a & OK != 0),
                "{}",
                name(nr as u64)
            );
        }
    }
}

#[cfg(test)]
mod foreign {
    use super::*;

    /// No generated range starts in a mapping outside the arena.
    #[test]
    fn ranges_start_in_the_arena_or_nowhere() {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/zero")
            .unwrap();
        let a = Arena::new(4, 3, &f);
        let shared = Shared::new();
        let maps: Vec<(u64, u64, String)> = std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| !l.ends_with("[vsyscall]"))
            .filter_map(|l| {
                let (r, _) = l.split_once(' ')?;
                let (x, y) = r.split_once('-')?;
                Some((
                    u64::from_str_radix(x, 16).ok()?,
                    u64::from_str_radix(y, 16).ok()?,
                    l.to_string(),
                ))
            })
            .collect();
        let devices = [0, 1, 2, 3];
        for t in 0..4 {
            let mut c = Caller {
                arena: &a,
                shared,
                rng: Rng::new(100 + t),
                thread: t as usize,
                slot: 0,
                threads: 4,
                devices: &devices,
                seed: 1,
                child: false,
                made: 0,
                maps: &[],
            };
            for _ in 0..300_000 {
                let call = c.gen();
                if known(call.req).is_none() || !checks_pass(&call.cmd) {
                    continue;
                }
                let addr = call.cmd.addr;
                if addr >= a.start && addr < a.end {
                    continue;
                }
                if let Some(m) = maps.iter().find(|m| m.0 <= addr && addr < m.1) {
                    panic!("{call:?} starts in {}", m.2);
                }
            }
        }
    }
}
