// SPDX-License-Identifier: GPL-2.0
// expect: E0599

//! Writing a migration's source folio, which may be device-private, through the guard of its lock.

use kernel::prelude::*;

use kernel::mm::migrate::MigrateVma;

/// Writes to the source folio of entry `i`.
pub fn misuse(mig: &MigrateVma<'_>, i: usize) -> Result {
    let src = mig.src_folio(i).ok_or(EINVAL)?;
    #[cfg(dmirror_compile_fail)]
    src.lock().write(0, b"dmirror")?;
    #[cfg(not(dmirror_compile_fail))]
    src.as_cpu().ok_or(EINVAL)?.read(0, &mut [0u8; 8])?;
    Ok(())
}
