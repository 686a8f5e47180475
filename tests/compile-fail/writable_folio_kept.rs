// SPDX-License-Identifier: GPL-2.0
// expect: E0277

//! Keeping a reference to a migration destination that still writes it once the migration took it and user space maps it: a write right is only borrowed, a kept reference reads.

use kernel::{
    mm::folio::{CpuFolio, LockedFolio},
    sync::aref::ARef,
};

/// Keeps a reference to `dst` before it goes to a migration.
#[cfg(dmirror_compile_fail)]
pub fn misuse(dst: &LockedFolio) -> ARef<kernel::mm::folio::WritableFolio> {
    ARef::from(dst.folio())
}

/// Keeps a reference to `dst` before it goes to a migration.
#[cfg(not(dmirror_compile_fail))]
pub fn misuse(dst: &LockedFolio) -> ARef<CpuFolio> {
    ARef::from(&**dst.folio())
}
