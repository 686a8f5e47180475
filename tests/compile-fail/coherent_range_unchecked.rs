// SPDX-License-Identifier: GPL-2.0
// expect: E0133

//! Registering device-coherent memory on a range no one vouched for: only the caller knows that nothing else uses it, so taking a range is `unsafe`.

use kernel::prelude::*;

use kernel::mm::memremap::{RangeError, ReservedRam};

/// Takes `[start, start + size)` as memory for a coherent device.
pub fn misuse(start: u64, size: u64, given: ReservedRam) -> Result<ReservedRam, RangeError> {
    #[cfg(dmirror_compile_fail)]
    return ReservedRam::check(start, size);
    #[cfg(not(dmirror_compile_fail))]
    return given.part(start, size);
}
