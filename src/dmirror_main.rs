// SPDX-License-Identifier: GPL-2.0

//! dmirror: a simulated device with its own memory, on zero-based ZONE_DEVICE refcounts.
//!
//! It serves the ioctl ABI of the kernel's C test driver (`lib/test_hmm_uapi.h`) on
//! `/dev/hmm_dmirror0` and `/dev/hmm_dmirror1` (device-private memory), so the upstream
//! `hmm-tests` selftest runs against it unchanged.

mod device;
mod file;
mod uapi;

use kernel::{
    miscdevice::{MiscDeviceOptions, MiscDeviceRegistration},
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
            description: "Device memory cap per device, in 512 MiB chunks (1..64)",
        },
    },
}

/// The device nodes, in teardown order: each registration is removed before its device's
/// memory is evicted (when the last reference to the device goes).
struct Dmirror {
    _devices: KVec<Pin<KBox<MiscDeviceRegistration<file::DmirrorFile>>>>,
}

impl kernel::Module for Dmirror {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let max_chunks = module_parameters::max_chunks.value();
        if !(1..=64).contains(&max_chunks) {
            pr_err!("max_chunks={} out of range 1..64\n", max_chunks);
            return Err(EINVAL);
        }
        let mut devices = KVec::new();
        for (id, name) in [(0, c"hmm_dmirror0"), (1, c"hmm_dmirror1")] {
            let device = device::Device::new(id, max_chunks as usize)?;
            let reg = KBox::pin_init(
                MiscDeviceRegistration::register_with_data(MiscDeviceOptions { name }, device),
                GFP_KERNEL,
            )?;
            devices.push(reg, GFP_KERNEL)?;
        }
        pr_info!(
            "loaded: 2 device-private devices, up to {} MiB each\n",
            max_chunks as usize * (device::CHUNK_SIZE >> 20)
        );
        Ok(Dmirror { _devices: devices })
    }
}

impl Drop for Dmirror {
    fn drop(&mut self) {
        pr_info!("unloaded\n");
    }
}
