// SPDX-License-Identifier: GPL-2.0
// expect: E0308

//! Copying the source of an eviction, which may be device-private, in `DevicePagemapOps::evict_copy`.

use kernel::prelude::*;

use kernel::mm::{
    folio::{Folio, LockedFolio},
    memremap::{DeviceFault, DevicePagemapOps, FreedFolio, VmFaultCode},
};

/// A device whose eviction copies the device folio itself.
pub struct Device;

impl DevicePagemapOps for Device {
    fn folio_free(&self, _folio: FreedFolio) {}

    fn migrate_to_ram(&self, _fault: &DeviceFault<'_>) -> VmFaultCode {
        VmFaultCode::SIGBUS
    }

    fn evict_copy(&self, _index: usize, src: &Folio, dst: &mut LockedFolio) {
        #[cfg(dmirror_compile_fail)]
        let copied = dst.copy_from(src);
        #[cfg(not(dmirror_compile_fail))]
        let copied = src.as_cpu().map_or(Err(EINVAL), |src| dst.copy_from(src));
        if copied.is_err() {
            dst.zero();
        }
    }
}
