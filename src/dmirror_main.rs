// SPDX-License-Identifier: GPL-2.0

//! dmirror: a simulated device with its own memory, on zero-based ZONE_DEVICE refcounts.
//!
//! It serves the ioctl ABI of the kernel's C test driver (`lib/test_hmm_uapi.h`) on
//! `/dev/hmm_dmirror0` and `/dev/hmm_dmirror1` (device-private memory) and, given reserved
//! ranges of real memory (`memmap=SIZE$START`), on `/dev/hmm_dmirror2` and `/dev/hmm_dmirror3`
//! (device-coherent memory), so the upstream `hmm-tests` selftest runs against it unchanged.
//!
//! # Lock order
//!
//! The driver's locks, outermost first (`docs/driver.md` states the same order; change both
//! together):
//!
//! 1. `Device::memory` (a mutex): taken to find or add a chunk, and by eviction (RELEASE, the
//!    last close, unload) to take the chunks out. Never taken while a mirror lock is held.
//!    Eviction evicts and drops the chunks after releasing it, so it never waits under it for
//!    a migration that needs it (chunks whose pages others still hold go back, in their
//!    slots); `Device::allocator()` waits there for an eviction in progress, holding no device
//!    page.
//! 2. The mirror's mutex (inside the MMU interval notifier of an open file): taken last among
//!    the sleeping locks. Nothing that may sleep on memory reclaim or on a page lock runs under
//!    it, since reclaim and migrations invalidate and invalidation takes it: mirror leaves are
//!    allocated before it is taken, folio locks are only tried.
//! 3. A backing table's lock (a spinlock that disables interrupts, because `folio_free` takes
//!    it wherever the last reference to a device page drops: in a bio completion or a socket
//!    buffer free, for coherent pages): innermost, held for lookups, updates and copies of a
//!    few pages (up to 64 pages per hold for single-page copies). One table lock at a time
//!    (same lock class; `device::TableLock` keeps one across a run of lookups). A page's
//!    backing is only dropped under it, so a folio found in the table stays alive while it is
//!    held.

mod copy;
mod debugfs;
mod device;
mod exclusive;
mod file;
mod migrate;
mod mirror;
mod snapshot;
mod uapi;

use kernel::{
    miscdevice::{MiscDeviceOptions, MiscDeviceRegistration},
    mm::memremap::{RangeError, ReservedRam, SECTION_SIZE},
    prelude::*,
};

module! {
    type: Dmirror,
    name: "dmirror",
    authors: ["dmirror developers"],
    description: "Simulated device memory on zero-based ZONE_DEVICE refcounts",
    license: "GPL",
    params: {
        max_chunks: u32 {
            default: 8,
            description: "Device-private memory cap per device, in 256 MiB chunks (1..64)",
        },
        fault_around: u32 {
            default: 1,
            description: "Pages a CPU fault on a small device-private page migrates back together: the naturally aligned window around it, a power of two 1..512",
        },
        coherent0_base: u64 {
            default: 0,
            description: "Physical base of RAM set aside for /dev/hmm_dmirror2 (coherent) with memmap=SIZE$START, which nothing else may use",
        },
        coherent0_size: u64 {
            default: 0,
            description: "Size in bytes of that range, a multiple of 128 MiB (0: no device)",
        },
        coherent1_base: u64 {
            default: 0,
            description: "Physical base of RAM set aside for /dev/hmm_dmirror3 (coherent) with memmap=SIZE$START, which nothing else may use",
        },
        coherent1_size: u64 {
            default: 0,
            description: "Size in bytes of that range, a multiple of 128 MiB (0: no device)",
        },
    },
}

/// Checks the range of coherent device `n` (module parameters `coherentN_base/_size`): none,
/// or a section-aligned range of RAM set aside with `memmap=SIZE$START`.
fn coherent_range(n: usize, base: u64, size: u64) -> Result<Option<ReservedRam>> {
    if base == 0 && size == 0 {
        return Ok(None);
    }
    if base == 0 || size == 0 {
        pr_err!(
            "coherent{n}_base={:#x} coherent{n}_size={:#x}: give both or neither\n",
            base,
            size
        );
        return Err(EINVAL);
    }
    // The `coherentN_base`/`coherentN_size` parameters name a range the administrator set aside
    // for this module with `memmap=SIZE$START` (their descriptions say so).
    // SAFETY: Nothing else uses a range set aside so; `check()` refuses what is surely not one.
    let why = match unsafe { ReservedRam::check(base, size) } {
        Ok(range) => return Ok(Some(range)),
        Err(RangeError::Misaligned) => "is not aligned to the 128 MiB memory section size",
        Err(RangeError::Overflow) => "wraps around the physical address space",
        Err(RangeError::SystemRam) => "overlaps System RAM",
        Err(RangeError::NotReserved) => "is not a reserved range (memmap=SIZE$START)",
        Err(RangeError::NotRam) => "is not RAM in the firmware's memory map (memmap=SIZE$START)",
        Err(RangeError::Busy) => "is in use",
        Err(RangeError::OutOfRange) => "is out of range",
    };
    pr_err!(
        "coherent{n}_base={:#x} coherent{n}_size={:#x}: the range {}\n",
        base,
        size,
        why
    );
    Err(EINVAL)
}

/// The device nodes, in teardown order: each registration is removed before its device's
/// memory is evicted (when the last reference to the device goes).
struct Dmirror {
    _devices: KVec<Pin<KBox<MiscDeviceRegistration<file::DmirrorFile>>>>,
    _debugfs: debugfs::Debugfs,
}

impl kernel::Module for Dmirror {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let max_chunks = module_parameters::max_chunks.value();
        if max_chunks == 0 || max_chunks as usize > device::MAX_SLOTS {
            pr_err!(
                "max_chunks={} out of range 1..{}\n",
                max_chunks,
                device::MAX_SLOTS
            );
            return Err(EINVAL);
        }
        let fault_around = module_parameters::fault_around.value();
        if !fault_around.is_power_of_two() || fault_around > 512 {
            pr_err!(
                "fault_around={} is not a power of two in 1..512\n",
                fault_around
            );
            return Err(EINVAL);
        }
        let ranges = [
            coherent_range(
                0,
                module_parameters::coherent0_base.value(),
                module_parameters::coherent0_size.value(),
            )?,
            coherent_range(
                1,
                module_parameters::coherent1_base.value(),
                module_parameters::coherent1_size.value(),
            )?,
        ];
        if let [Some(r0), Some(r1)] = ranges {
            if r0.start() < r1.start() + r1.size() && r1.start() < r0.start() + r0.size() {
                pr_err!("the ranges of coherent0 and coherent1 overlap\n");
                return Err(EINVAL);
            }
        }
        const _: () = assert!(device::CHUNK_SIZE % SECTION_SIZE == 0);
        let mut devices = KVec::new();
        let mut inspect = KVec::new();
        let names = [
            c"hmm_dmirror0",
            c"hmm_dmirror1",
            c"hmm_dmirror2",
            c"hmm_dmirror3",
        ];
        for (id, name) in names.into_iter().enumerate() {
            let device = match id {
                0 | 1 => device::Device::new(id, max_chunks as usize, fault_around as usize)?,
                _ => match ranges[id - 2] {
                    Some(range) => device::Device::new_coherent(id, range)?,
                    None => continue,
                },
            };
            inspect.push((name, device.clone()), GFP_KERNEL)?;
            let reg = KBox::pin_init(
                MiscDeviceRegistration::register_with_data(MiscDeviceOptions { name }, device),
                GFP_KERNEL,
            )?;
            devices.push(reg, GFP_KERNEL)?;
        }
        let debugfs = debugfs::Debugfs::new(&inspect)?;
        pr_info!(
            "loaded: 2 device-private devices, up to {} MiB each; {} device-coherent\n",
            max_chunks as usize * (device::CHUNK_SIZE >> 20),
            devices.len() - 2
        );
        Ok(Dmirror {
            _devices: devices,
            _debugfs: debugfs,
        })
    }
}

impl Drop for Dmirror {
    fn drop(&mut self) {
        pr_info!("unloaded\n");
    }
}
