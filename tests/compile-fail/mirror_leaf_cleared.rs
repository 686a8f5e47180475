// SPDX-License-Identifier: GPL-2.0
// expect: E0502

//! Reading a page that a mirror leaf holds after its slot was cleared: clearing gives up the slot's reference on the folio, which may then be freed.

use kernel::prelude::*;

use kernel::mm::hmm::{MirrorLeaf, Slot};

/// Reads the first bytes of the page in slot 0 of `leaf`, and clears the slot.
pub fn misuse(leaf: &mut MirrorLeaf<64>) -> Result {
    let Slot::Page { folio, offset, .. } = leaf.get(0) else {
        return Err(ENOENT);
    };
    #[cfg(dmirror_compile_fail)]
    leaf.clear(0);
    let mut out = [0u8; 8];
    folio.read(offset, &mut out)?;
    leaf.clear(0);
    Ok(())
}
