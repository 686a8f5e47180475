// SPDX-License-Identifier: GPL-2.0
// expect: E0599

//! CPU access to a folio an HMM range fault reported, which may be the device's own device-private memory.

use kernel::prelude::*;

use kernel::mm::{
    folio::CpuFolio,
    hmm::HmmRange,
    mmu_notifier::MmuIntervalNotifierOps,
};

/// Reads the folio of entry 0 of a range.
pub fn misuse<T: MmuIntervalNotifierOps>(range: &HmmRange<'_, T>) -> Result {
    let valid = range.lock_if_valid().ok_or(EBUSY)?;
    let folio = range.folio(0, &valid).ok_or(EFAULT)?;
    let mut buf = [0u8; 8];
    #[cfg(dmirror_compile_fail)]
    folio.read(0, &mut buf)?;
    #[cfg(not(dmirror_compile_fail))]
    if let Ok(cpu) = CpuFolio::try_from_folio(folio) {
        cpu.read(0, &mut buf)?;
    }
    Ok(())
}
