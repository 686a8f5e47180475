// SPDX-License-Identifier: GPL-2.0
// expect: E0599

//! Locking a `DeviceFolio` that already holds its folio's lock (it would wait for ever).

use kernel::prelude::*;

use kernel::mm::memremap::{DevPagemap, DevicePagemapOps};

/// Locks a device folio that `alloc()` returned locked.
pub fn misuse<T: DevicePagemapOps>(pm: &DevPagemap<T>) -> Result<usize> {
    let folio = pm.alloc(0)?;
    #[cfg(dmirror_compile_fail)]
    let _guard = folio.lock();
    Ok(folio.nr_pages())
}
