// SPDX-License-Identifier: GPL-2.0
// expect: E0308

//! A migration with a raw owner token, which could be another driver's (whose notifier would then ignore the migration's invalidations): the owner is a `&PagemapOwner`.

use kernel::prelude::*;

use kernel::mm::{
    memremap::PagemapOwner,
    migrate::{MigrateVma, SelectFlag},
    MmWithUser,
};

/// Migrates the page at `addr` as the owner `owner` would.
pub fn misuse(mm: &MmWithUser, addr: usize, owner: &PagemapOwner<()>) -> Result<usize> {
    let mmap = mm.mmap_read_lock();
    let end = addr + kernel::page::PAGE_SIZE;
    #[cfg(dmirror_compile_fail)]
    let owner = owner.token();
    #[cfg(not(dmirror_compile_fail))]
    let owner = Some(owner);
    let mig = MigrateVma::setup(&mmap, addr, end, owner, SelectFlag::DevicePrivate)?;
    Ok(mig.cpages())
}
