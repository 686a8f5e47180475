// SPDX-License-Identifier: GPL-2.0

//! dmirror: a simulated device with its own memory, on zero-based ZONE_DEVICE refcounts.
//!
//! It serves the ioctl ABI of the kernel's C test driver (`lib/test_hmm_uapi.h`) on
//! `/dev/hmm_dmirror0` and `/dev/hmm_dmirror1` (device-private memory) and, given reserved
//! ranges of real memory (`memmap=SIZE$START`), on `/dev/hmm_dmirror2` and `/dev/hmm_dmirror3`
//! (device-coherent memory), so the upstream `hmm-tests` selftest runs against it unchanged.

mod debugfs;
mod device;
mod file;
mod uapi;

use kernel::{
    miscdevice::{MiscDeviceOptions, MiscDeviceRegistration},
    mm::memremap::{check_reserved_range, RangeError, SECTION_SIZE},
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
        coherent0_base: u64 {
            default: 0,
            description: "Physical base of the reserved range of /dev/hmm_dmirror2 (coherent)",
        },
        coherent0_size: u64 {
            default: 0,
            description: "Size in bytes of that range, a multiple of 128 MiB (0: no device)",
        },
        coherent1_base: u64 {
            default: 0,
            description: "Physical base of the reserved range of /dev/hmm_dmirror3 (coherent)",
        },
        coherent1_size: u64 {
            default: 0,
            description: "Size in bytes of that range, a multiple of 128 MiB (0: no device)",
        },
    },
}

/// Checks the range of coherent device `n` (module parameters `coherentN_base/_size`): none,
/// or a reserved, section-aligned range of real memory that is not System RAM.
fn coherent_range(n: usize, base: u64, size: u64) -> Result<Option<(u64, usize)>> {
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
    let why = match check_reserved_range(base, size) {
        Ok(()) => return Ok(Some((base, usize::try_from(size).map_err(|_| EINVAL)?))),
        Err(RangeError::Misaligned) => "is not aligned to the 128 MiB memory section size",
        Err(RangeError::Overflow) => "wraps around the physical address space",
        Err(RangeError::SystemRam) => "overlaps System RAM",
        Err(RangeError::NotReserved) => "is not a reserved range (memmap=SIZE$START)",
        Err(RangeError::Busy) => "is in use",
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
        if !(1..=64).contains(&max_chunks) {
            pr_err!("max_chunks={} out of range 1..64\n", max_chunks);
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
        if let [Some((b0, s0)), Some((b1, s1))] = ranges {
            if b0 < b1 + s1 as u64 && b1 < b0 + s0 as u64 {
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
                0 | 1 => device::Device::new(id, max_chunks as usize)?,
                _ => match ranges[id - 2] {
                    Some((base, size)) => device::Device::new_coherent(id, base, size)?,
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
