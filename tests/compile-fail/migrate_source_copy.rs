// SPDX-License-Identifier: GPL-2.0
// expect: E0308

//! Copying the source of a migration to system memory, which may be device-private, with `LockedFolio::copy_from`: what a `migrate_to_ram` handler would write first.

use kernel::prelude::*;

use kernel::mm::{folio::LockedFolio, migrate::MigrateVma};

/// Fills a destination from the source of entry `i`.
pub fn misuse(mig: &MigrateVma<'_>, i: usize, dst: &mut LockedFolio) -> Result {
    let (src, _page) = mig.source(i).ok_or(EINVAL)?;
    #[cfg(dmirror_compile_fail)]
    return dst.copy_from(src);
    #[cfg(not(dmirror_compile_fail))]
    return dst.copy_from(src.as_cpu().ok_or(EINVAL)?);
}
