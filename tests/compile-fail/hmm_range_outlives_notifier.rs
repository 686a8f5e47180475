// SPDX-License-Identifier: GPL-2.0
// expect: E0505

//! An `HmmRange` used after its notifier was dropped: the range borrows the notifier.

use kernel::prelude::*;

use kernel::mm::{
    hmm::{FaultFlags, HmmRange},
    memremap::PagemapOwner,
    mmu_notifier::{MmuIntervalNotifier, MmuIntervalNotifierOps},
    MmWithUser,
};

/// Faults a page under a notifier, then drops the notifier before looking at the result.
pub fn misuse<T: MmuIntervalNotifierOps>(mm: &MmWithUser, addr: usize, state: T) -> Result {
    let notifier = KBox::pin_init(
        MmuIntervalNotifier::new(mm, addr, kernel::page::PAGE_SIZE, state),
        GFP_KERNEL,
    )?;
    let seq = notifier.read_begin();
    let range = {
        let mmap = mm.mmap_read_lock();
        HmmRange::fault(
            &notifier,
            &mmap,
            seq,
            addr,
            1,
            FaultFlags::SNAPSHOT,
            None::<&PagemapOwner<()>>,
        )?
    };
    #[cfg(dmirror_compile_fail)]
    drop(notifier);
    let valid = range.lock_if_valid().is_some();
    #[cfg(not(dmirror_compile_fail))]
    drop(notifier);
    if valid {
        Ok(())
    } else {
        Err(EBUSY)
    }
}
