// SPDX-License-Identifier: GPL-2.0
// expect: E0599

//! Writing a page an HMM fault found mapped read-only (the shared zero page, a file mapped read-only): only a writable entry gives a grant, which gives a `WritableFolio`.

use kernel::prelude::*;

use kernel::mm::{hmm::HmmRange, mmu_notifier::MmuIntervalNotifierOps};

/// Writes the page of entry 0 of a range on the process's behalf.
pub fn misuse<T: MmuIntervalNotifierOps>(range: &HmmRange<'_, T>) -> Result {
    let valid = range.lock_if_valid().ok_or(EBUSY)?;
    #[cfg(dmirror_compile_fail)]
    let folio = range.cpu_folio(0, &valid).ok_or(EFAULT)?;
    #[cfg(not(dmirror_compile_fail))]
    let grant = range.write_grant(0, &valid).ok_or(EFAULT)?;
    #[cfg(not(dmirror_compile_fail))]
    let folio = grant.writable(&valid).ok_or(EBUSY)?;
    let mut guard = folio.try_lock().ok_or(EBUSY)?;
    guard.write(0, b"dmirror")
}
