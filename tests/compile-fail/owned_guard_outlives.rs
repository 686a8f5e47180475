// SPDX-License-Identifier: GPL-2.0
// expect: E0597

//! Keeping the writable borrow of a driver-owned folio past its lock guard, to write it after a migration took it: what a guard permits ends with it.

use kernel::prelude::*;

use kernel::mm::folio::OwnedFolio;

/// Writes `backing` with a borrow taken under an earlier lock.
pub fn misuse(backing: &OwnedFolio) -> Result {
    #[cfg(dmirror_compile_fail)]
    let folio = {
        let guard = backing.try_lock().ok_or(EBUSY)?;
        guard.folio()
    };
    #[cfg(not(dmirror_compile_fail))]
    let guard = backing.try_lock().ok_or(EBUSY)?;
    #[cfg(not(dmirror_compile_fail))]
    let folio = guard.folio();
    let _ = folio.nr_pages();
    Ok(())
}
