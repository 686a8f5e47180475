// SPDX-License-Identifier: GPL-2.0
// expect: E0505

//! Writing a page an HMM fault found writable after the notifier lock that proves it still is was dropped: a `fork()` or `munmap()` may have taken the write right away since.

use kernel::prelude::*;

use kernel::mm::{hmm::HmmRange, mmu_notifier::MmuIntervalNotifierOps};

/// Writes the page of entry 0 of a range on the process's behalf.
pub fn misuse<T: MmuIntervalNotifierOps>(range: &HmmRange<'_, T>) -> Result {
    let valid = range.lock_if_valid().ok_or(EBUSY)?;
    let grant = range.write_grant(0, &valid).ok_or(EFAULT)?;
    let folio = grant.writable(&valid).ok_or(EBUSY)?;
    #[cfg(dmirror_compile_fail)]
    drop(valid);
    let mut guard = folio.try_lock().ok_or(EBUSY)?;
    guard.write(0, b"dmirror")
}
