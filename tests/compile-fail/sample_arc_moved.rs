// SPDX-License-Identifier: GPL-2.0
// expect: E0382
// expect-msg: borrow of moved value: `first`

//! Harness self-check of the compile-fail suite, not a check of an API of ours: using a
//! `kernel::sync::Arc` after moving it must not compile; the control clones it instead.

use kernel::prelude::*;
use kernel::sync::Arc;

module! {
    type: SampleArcMoved,
    name: "sample_arc_moved",
    authors: ["dmirror developers"],
    description: "Compile-fail harness self-check: an Arc used after a move",
    license: "GPL",
}

/// The module's (empty) state.
struct SampleArcMoved;

impl kernel::Module for SampleArcMoved {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let first = Arc::new(7u32, GFP_KERNEL)?;
        #[cfg(dmirror_compile_fail)]
        let second = first;
        #[cfg(not(dmirror_compile_fail))]
        let second = first.clone();
        pr_info!("{} {}\n", *first, *second);
        Ok(SampleArcMoved)
    }
}
