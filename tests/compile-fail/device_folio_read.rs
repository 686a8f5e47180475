// SPDX-License-Identifier: GPL-2.0
// expect: E0599

//! CPU access to a device-private folio through `DeviceFolio`: it has no data accessors and no `Deref` to a folio.

use kernel::prelude::*;

use kernel::mm::memremap::{DevPagemap, DevicePagemapOps};

/// Reads a freshly allocated device folio, which may be device-private memory.
pub fn misuse<T: DevicePagemapOps>(pm: &DevPagemap<T>) -> Result {
    let folio = pm.alloc(0)?;
    let mut buf = [0u8; 8];
    #[cfg(dmirror_compile_fail)]
    folio.read(0, &mut buf)?;
    #[cfg(not(dmirror_compile_fail))]
    {
        buf[0] = folio.order() as u8;
    }
    let _ = buf;
    Ok(())
}
