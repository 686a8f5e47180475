// SPDX-License-Identifier: GPL-2.0

//! The ioctl ABI of `lib/test_hmm_uapi.h`, which the upstream `hmm-tests` selftest speaks.
//!
//! Userspace's copy (`crates/abi/src/uapi.rs`) documents the errnos of each command.

use kernel::ioctl::_IOWR;

/// The command block of every ioctl (`struct hmm_dmirror_cmd`), read and written field by
/// field as `u64`s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Cmd {
    /// Target virtual address in the opener's address space.
    pub(crate) addr: u64,
    /// User buffer for data or snapshot bytes.
    pub(crate) ptr: u64,
    /// Number of pages (for FLAGS: the flags).
    pub(crate) npages: u64,
    /// Out: pages handled.
    pub(crate) cpages: u64,
    /// Out: fault rounds needed.
    pub(crate) faults: u64,
}

const _: () = assert!(core::mem::size_of::<Cmd>() == 40);

const TYPE: u32 = b'H' as u32;

/// Copies device memory that mirrors `addr` into `ptr`, faulting it in as needed.
pub(crate) const READ: u32 = _IOWR::<Cmd>(TYPE, 0x00);
/// Copies `ptr` into the mirror of `addr`, faulting it in writable as needed.
pub(crate) const WRITE: u32 = _IOWR::<Cmd>(TYPE, 0x01);
/// Migrates the range to device memory.
pub(crate) const MIGRATE_TO_DEV: u32 = _IOWR::<Cmd>(TYPE, 0x02);
/// Migrates this device's pages in the range back to system memory.
pub(crate) const MIGRATE_TO_SYS: u32 = _IOWR::<Cmd>(TYPE, 0x03);
/// Writes one byte per page describing the CPU mapping.
pub(crate) const SNAPSHOT: u32 = _IOWR::<Cmd>(TYPE, 0x04);
/// Takes device-exclusive access to the range.
pub(crate) const EXCLUSIVE: u32 = _IOWR::<Cmd>(TYPE, 0x05);
/// Checks that no page of the range is mapped device-exclusive by this file.
pub(crate) const CHECK_EXCLUSIVE: u32 = _IOWR::<Cmd>(TYPE, 0x06);
/// Evicts all device memory of the device.
pub(crate) const RELEASE: u32 = _IOWR::<Cmd>(TYPE, 0x07);
/// Sets the file's flags from `npages`.
pub(crate) const FLAGS: u32 = _IOWR::<Cmd>(TYPE, 0x08);
/// As READ, faulting without holding the mmap lock across the fault.
pub(crate) const READ_UNLOCKED: u32 = _IOWR::<Cmd>(TYPE, 0x09);

/// FLAGS bit: fail the next device memory allocation.
pub(crate) const FLAG_FAIL_ALLOC: u64 = 1 << 0;

/// SNAPSHOT byte values.
pub(crate) mod prot {
    pub(crate) const ERROR: u8 = 0xff;
    pub(crate) const NONE: u8 = 0x00;
    pub(crate) const READ: u8 = 0x01;
    pub(crate) const WRITE: u8 = 0x02;
    pub(crate) const PMD: u8 = 0x04;
    pub(crate) const ZERO: u8 = 0x10;
    pub(crate) const DEV_PRIVATE_LOCAL: u8 = 0x20;
    pub(crate) const DEV_PRIVATE_REMOTE: u8 = 0x30;
    pub(crate) const DEV_COHERENT_LOCAL: u8 = 0x40;
    pub(crate) const DEV_COHERENT_REMOTE: u8 = 0x50;
}
