//! The ioctl ABI of `lib/test_hmm_uapi.h`, and the errno contract of each command.
//!
//! `dmirror.ko` serves this ABI (its side is `src/uapi.rs`, its dispatch `src/file.rs`, its
//! handlers `src/copy.rs`, `migrate.rs`, `snapshot.rs` and `exclusive.rs`), as does the C
//! `test_hmm.ko`; the upstream `hmm-tests` selftest speaks it. Every command takes
//! a [`Cmd`] at the ioctl's argument and works on the range of `npages` pages of 4096 bytes
//! ([`PAGE`]) from `addr` in the address space of the process that opened the device node.
//!
//! # Every command
//!
//! Before a command looks at its range, the driver answers, whatever the command:
//!
//! - `ENOTTY`: the request is none of the ten [`COMMANDS`] (another type, number, size or
//!   direction), before the block is read. Only the low 32 bits of the request reach the
//!   driver.
//! - `EFAULT`: the 40 bytes of the command block cannot be read (NULL, unmapped, a kernel or
//!   non-canonical address, `PROT_NONE`, running into an unmapped page); or, once the command
//!   ran, they cannot be written back (a read-only block): the command's effects stay, its
//!   results are lost.
//! - `EINVAL`: `npages` is 0, `addr` is not page-aligned, `npages * 4096` does not fit in 64
//!   bits, or the range reaches 2^64.
//!
//! When the opener's address space is gone (the descriptor lives on in a child after the
//! opener exited), the commands that use it fail as each says below. On success the block is
//! written back with `addr`, `ptr` and `npages` as passed and `cpages` and `faults` computed
//! (the values passed in are ignored); on any other failure the block is left as it was.
//! Where a command copies to or from `ptr`, a buffer that wraps around the address space or
//! that the kernel cannot read (or write, for the commands that write it) gives `EFAULT`.
//!
//! A fault that concurrent invalidations keep from completing is retried for at most one
//! second, then the command fails with `EBUSY`. `ENOMEM` is always possible where the driver
//! allocates (its mirror's tables, bounce buffers, device memory).

/// The page size of the ABI's ranges and buffers: `npages` counts pages of this size.
pub const PAGE: usize = 4096;

/// `struct hmm_dmirror_cmd`: the command block of every command.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Cmd {
    /// In: the range's first address, page-aligned.
    pub addr: u64,
    /// In: the user buffer the command copies data or SNAPSHOT bytes to or from.
    pub ptr: u64,
    /// In: the range's length in pages (for [`FLAGS`]: the flags).
    pub npages: u64,
    /// Out: the pages handled.
    pub cpages: u64,
    /// Out: the fault rounds needed ([`READ`], [`READ_UNLOCKED`], [`WRITE`]).
    pub faults: u64,
}

const _: () = assert!(std::mem::size_of::<Cmd>() == 40);

/// `_IOC(dir, ty, nr, size)`: an ioctl number (`dir` 0 none, 1 write, 2 read, 3 both).
pub const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}

/// `_IOWR('H', nr, struct hmm_dmirror_cmd)`: the request of command number `nr`.
pub const fn iowr(nr: u64) -> u64 {
    ioc(3, b'H' as u64, nr, std::mem::size_of::<Cmd>() as u64)
}

/// The command numbers (`nr` of [`iowr`]): the index of each command in [`COMMANDS`].
pub mod nr {
    /// The number of [`READ`](super::READ).
    pub const READ: u64 = 0;
    /// The number of [`WRITE`](super::WRITE).
    pub const WRITE: u64 = 1;
    /// The number of [`MIGRATE_TO_DEV`](super::MIGRATE_TO_DEV).
    pub const MIGRATE_TO_DEV: u64 = 2;
    /// The number of [`MIGRATE_TO_SYS`](super::MIGRATE_TO_SYS).
    pub const MIGRATE_TO_SYS: u64 = 3;
    /// The number of [`SNAPSHOT`](super::SNAPSHOT).
    pub const SNAPSHOT: u64 = 4;
    /// The number of [`EXCLUSIVE`](super::EXCLUSIVE).
    pub const EXCLUSIVE: u64 = 5;
    /// The number of [`CHECK_EXCLUSIVE`](super::CHECK_EXCLUSIVE).
    pub const CHECK_EXCLUSIVE: u64 = 6;
    /// The number of [`RELEASE`](super::RELEASE).
    pub const RELEASE: u64 = 7;
    /// The number of [`FLAGS`](super::FLAGS).
    pub const FLAGS: u64 = 8;
    /// The number of [`READ_UNLOCKED`](super::READ_UNLOCKED).
    pub const READ_UNLOCKED: u64 = 9;
}

/// Copies the device's mirror of the range to `ptr` (`npages * 4096` bytes), faulting the
/// pages into the mirror, readable, as needed.
///
/// `cpages` is `npages`, `faults` the fault rounds it took. Errors:
/// - `EFAULT`: a page of the range has no mapping or one that is not readable (a hole,
///   `PROT_NONE`); `ptr` cannot take the data; the opener's address space is gone.
/// - `EBUSY`: invalidations kept a fault from completing for one second.
pub const READ: u64 = iowr(nr::READ);

/// Copies `ptr` (`npages * 4096` bytes) into the device's mirror of the range, faulting the
/// pages into the mirror, writable, as needed.
///
/// A page of the device's own memory mapped read-only by copy-on-write after `fork()` is
/// faulted back to system memory and written there. `cpages` is `npages`, `faults` the fault
/// rounds it took. Errors:
/// - `EFAULT`: a page of the range has no mapping or one that is not readable; `ptr` cannot
///   be read; the opener's address space is gone.
/// - `EPERM`: a page of the range is mapped read-only, in system or in device memory.
/// - `EBUSY`: invalidations kept the faults, or the writes after them, from completing for
///   one second.
///
/// After an error the pages before the one refused may have been written; a range refused
/// at its first page (a read-only mapping, an unusable `ptr`) is left as it was.
pub const WRITE: u64 = iowr(nr::WRITE);

/// Migrates the anonymous system pages of the range to the device's memory (private or
/// coherent, by device node), then copies the range's data from there to `ptr`
/// (`npages * 4096` bytes), the readback that tells the caller every page got there.
///
/// Pages already in this device's memory stay. `cpages` is `npages`. Errors:
/// - `EINVAL`: a page of the range has no mapping or one that is not readable (a hole,
///   `PROT_NONE`; the windows of the range before it may have been migrated); a mapping
///   `migrate_vma_setup()` refuses (the device's own `mmap`, `VM_MIXEDMAP`); the opener's
///   address space is gone.
/// - `ENOMEM`: the device's memory is full (its `max_chunks` cap, or the coherent device's
///   range): the pages that got device memory are migrated, the rest stay.
/// - `ENOENT`: the readback found a page that is not in the device's memory: a page of a
///   shared file mapping (it stays in the page cache), one [`FLAG_FAIL_ALLOC`] kept in system
///   memory, or one that moved away meanwhile.
/// - `EFAULT`: `ptr` cannot take the readback.
/// - `EBUSY`: on a coherent device, invalidations kept the migrated pages from being
///   mirrored for one second.
pub const MIGRATE_TO_DEV: u64 = iowr(nr::MIGRATE_TO_DEV);

/// Migrates this device's pages in the range back to system memory; `ptr` is not used.
///
/// `cpages` is the number of pages moved (0 for a range with none of the device's pages).
/// Errors:
/// - `EINVAL`: as [`MIGRATE_TO_DEV`]'s.
/// - `ENOMEM`: a system page could not be had, or [`FLAG_FAIL_ALLOC`] failed one: the
///   window's pages stay in the device's memory.
pub const MIGRATE_TO_SYS: u64 = iowr(nr::MIGRATE_TO_SYS);

/// Writes one byte per page of the range to `ptr` (`npages` bytes) describing its CPU
/// mapping, without faulting anything in: a `PROT_*` value (see [`valid_prot`]).
///
/// A page without a readable mapping (a hole, `PROT_NONE`) gets [`PROT_ERROR`], a mapped page
/// that is not present [`PROT_NONE`]. `cpages` is `npages`. Errors:
/// - `EFAULT`: `ptr` cannot take the bytes (those of the windows of 64 pages before are
///   written).
/// - `EINVAL`: the opener's address space is gone.
/// - `EBUSY`: invalidations kept a window from validating for one second.
pub const SNAPSHOT: u64 = iowr(nr::SNAPSHOT);

/// Takes device-exclusive access to every page of the range and mirrors the pages as such,
/// then copies their data to `ptr` (`npages * 4096` bytes) as [`MIGRATE_TO_DEV`] does.
///
/// A CPU access to a page ends its exclusive access. `cpages` is `npages`. Errors:
/// - `EFAULT`: a page of the range has no mapping, is `PROT_NONE` or read-only; `ptr`
///   cannot take the readback.
/// - `EOPNOTSUPP`: a page is not private anonymous memory (a shared file mapping, the
///   device's own `mmap`).
/// - `ENOENT`: the readback found a page that is no longer mirrored (a CPU access or an
///   unmap ended its exclusive access meanwhile).
/// - `EINVAL`: the opener's address space is gone.
/// - `EBUSY`: invalidations kept a page from being mirrored for one second.
pub const EXCLUSIVE: u64 = iowr(nr::EXCLUSIVE);

/// Checks that no page of the range is mirrored device-exclusive by this open file.
///
/// Looks only at what is mirrored, so any `npages` answers at once; `ptr` is not used.
/// Errors:
/// - `EPERM`: a page of the range is mirrored device-exclusive.
pub const CHECK_EXCLUSIVE: u64 = iowr(nr::CHECK_EXCLUSIVE);

/// Evicts all of the device's memory back to system memory and unregisters it; the range
/// must pass the common checks but is not used, nor is `ptr`.
///
/// Errors:
/// - `EBUSY`: a page someone else holds (a pin for direct I/O, a pipe buffer after
///   `vmsplice()`) was not given back within 2 s: the memory stays registered with its data
///   in place, and the next eviction takes it. A signal interrupts that wait the same way
///   (`ERESTARTSYS`: the command restarts after the handler, or fails with `EINTR` without
///   `SA_RESTART`).
pub const RELEASE: u64 = iowr(nr::RELEASE);

/// Sets the open file's flags to `npages` (see [`FLAG_FAIL_ALLOC`]); `addr` must pass the
/// common checks, `ptr` is not used.
///
/// Never fails past the common checks; since `npages` 0 is refused with `EINVAL` there, the
/// flags cannot be cleared, only replaced.
pub const FLAGS: u64 = iowr(nr::FLAGS);

/// As [`READ`], with faults that do not hold the mmap lock throughout
/// (`hmm_range_fault()` may drop it to wait for a page).
pub const READ_UNLOCKED: u64 = iowr(nr::READ_UNLOCKED);

/// The ten commands, by number, with their names in `lib/test_hmm_uapi.h` (less the prefix).
pub const COMMANDS: [(u64, &str); 10] = [
    (READ, "READ"),
    (WRITE, "WRITE"),
    (MIGRATE_TO_DEV, "MIGRATE_TO_DEV"),
    (MIGRATE_TO_SYS, "MIGRATE_TO_SYS"),
    (SNAPSHOT, "SNAPSHOT"),
    (EXCLUSIVE, "EXCLUSIVE"),
    (CHECK_EXCLUSIVE, "CHECK_EXCLUSIVE"),
    (RELEASE, "RELEASE"),
    (FLAGS, "FLAGS"),
    (READ_UNLOCKED, "READ_UNLOCKED"),
];

/// [`FLAGS`] bit: the next device memory allocation of a migration fails (a system page
/// allocation, for [`MIGRATE_TO_SYS`]); the bit is cleared as it takes effect.
pub const FLAG_FAIL_ALLOC: u64 = 1;

/// SNAPSHOT: no page could be described (no VMA, or one HMM cannot read).
pub const PROT_ERROR: u8 = 0xff;
/// SNAPSHOT: nothing present (the page was never touched, or it was unmapped).
pub const PROT_NONE: u8 = 0x00;
/// SNAPSHOT: mapped read-only.
pub const PROT_READ: u8 = 0x01;
/// SNAPSHOT: mapped writable.
pub const PROT_WRITE: u8 = 0x02;
/// SNAPSHOT: mapped by a PMD (a huge page), with [`PROT_READ`] or [`PROT_WRITE`].
pub const PROT_PMD: u8 = 0x04;
/// SNAPSHOT: mapped by a PUD (the C driver's; dmirror never reports it).
pub const PROT_PUD: u8 = 0x08;
/// SNAPSHOT: the shared zero page.
pub const PROT_ZERO: u8 = 0x10;
/// SNAPSHOT: the page is in this device's private memory.
pub const PROT_DEV_PRIVATE_LOCAL: u8 = 0x20;
/// SNAPSHOT: the page is in another device's private memory.
pub const PROT_DEV_PRIVATE_REMOTE: u8 = 0x30;
/// SNAPSHOT: the page is in this device's coherent memory.
pub const PROT_DEV_COHERENT_LOCAL: u8 = 0x40;
/// SNAPSHOT: the page is in another device's coherent memory.
pub const PROT_DEV_COHERENT_REMOTE: u8 = 0x50;
/// The bits of a SNAPSHOT byte that say where the page is (none for system memory).
pub const PROT_DEV_MASK: u8 = 0xf0;

/// Whether `b` is a byte SNAPSHOT can write: [`PROT_ERROR`], [`PROT_NONE`], or one of the
/// page kinds (system, zero page, private or coherent, local or remote) with exactly one of
/// [`PROT_READ`] and [`PROT_WRITE`], and maybe [`PROT_PMD`].
pub fn valid_prot(b: u8) -> bool {
    if b == PROT_NONE || b == PROT_ERROR {
        return true;
    }
    let kind = b & PROT_DEV_MASK;
    let rw = b & (PROT_READ | PROT_WRITE);
    matches!(
        kind,
        0x00 | PROT_ZERO
            | PROT_DEV_PRIVATE_LOCAL
            | PROT_DEV_PRIVATE_REMOTE
            | PROT_DEV_COHERENT_LOCAL
            | PROT_DEV_COHERENT_REMOTE
    ) && (rw == PROT_READ || rw == PROT_WRITE)
        && b & PROT_PUD == 0
}

/// The name of a request in [`COMMANDS`], as the driver sees it (its low 32 bits).
pub fn command_name(req: u64) -> Option<&'static str> {
    COMMANDS
        .iter()
        .find(|(r, _)| *r == req & 0xffff_ffff)
        .map(|(_, n)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_those_of_the_header() {
        // `_IOWR('H', 0x00, struct hmm_dmirror_cmd)` and `_IOWR('H', 0x09, ...)`.
        assert_eq!(READ, 0xc028_4800);
        assert_eq!(READ_UNLOCKED, 0xc028_4809);
        for (i, (req, _)) in COMMANDS.iter().enumerate() {
            assert_eq!(*req, iowr(i as u64));
        }
        assert_eq!(command_name(SNAPSHOT | 0xdead_beef << 32), Some("SNAPSHOT"));
        assert_eq!(command_name(iowr(10)), None);
    }

    #[test]
    fn snapshot_bytes() {
        let valid: Vec<u8> = (0..=255u8).filter(|&b| valid_prot(b)).collect();
        // NONE, ERROR, and six kinds with READ or WRITE, each with or without PMD.
        assert_eq!(valid.len(), 2 + 6 * 2 * 2);
        assert!(valid_prot(PROT_DEV_COHERENT_LOCAL | PROT_WRITE | PROT_PMD));
        assert!(!valid_prot(PROT_DEV_PRIVATE_LOCAL));
        assert!(!valid_prot(PROT_READ | PROT_WRITE));
        assert!(!valid_prot(PROT_WRITE | PROT_PUD));
        assert!(!valid_prot(0x60 | PROT_READ));
    }
}
