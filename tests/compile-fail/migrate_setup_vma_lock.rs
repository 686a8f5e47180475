// SPDX-License-Identifier: GPL-2.0
// expect: E0308

//! `MigrateVma::setup` with a VMA held only by its per-VMA lock: the page table walk asserts the mmap lock.

use kernel::prelude::*;

use kernel::mm::{
    memremap::PagemapOwner,
    migrate::{MigrateVma, SelectFlag},
    MmWithUser,
};

/// Sets up a migration of one page at `addr`.
pub fn misuse(mm: &MmWithUser, addr: usize) -> Result<usize> {
    let end = addr + kernel::page::PAGE_SIZE;
    #[cfg(dmirror_compile_fail)]
    let lock = mm.lock_vma_under_rcu(addr).ok_or(EAGAIN)?;
    #[cfg(not(dmirror_compile_fail))]
    let lock = mm.mmap_read_lock();
    let owner: Option<&PagemapOwner<()>> = None;
    let mig = MigrateVma::setup(&lock, addr, end, owner, SelectFlag::System)?;
    Ok(mig.cpages())
}
