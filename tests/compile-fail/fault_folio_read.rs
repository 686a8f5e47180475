// SPDX-License-Identifier: GPL-2.0
// expect: E0599

//! CPU access to the faulting device-private folio of a `migrate_to_ram` callback.

use kernel::prelude::*;

use kernel::mm::memremap::DeviceFault;

/// Reads the faulting folio, which is device-private memory.
pub fn misuse(fault: &DeviceFault<'_>) -> Result {
    let mut buf = [0u8; 8];
    #[cfg(dmirror_compile_fail)]
    fault.folio().read(0, &mut buf)?;
    #[cfg(not(dmirror_compile_fail))]
    if let Some(cpu) = fault.folio().as_cpu() {
        cpu.read(0, &mut buf)?;
    }
    Ok(())
}
