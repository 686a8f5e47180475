// SPDX-License-Identifier: GPL-2.0
// expect: E0308
// expect-msg: expected `usize`, found `&str`

//! Harness self-check of the compile-fail suite, not a check of an API of ours: a `&str` where
//! `KVec::with_capacity` takes a `usize` must not compile; the control passes a `usize`.

use kernel::prelude::*;

module! {
    type: SampleKvecType,
    name: "sample_kvec_type",
    authors: ["dmirror developers"],
    description: "Compile-fail harness self-check: a &str where a usize is expected",
    license: "GPL",
}

/// The module's (empty) state.
struct SampleKvecType;

impl kernel::Module for SampleKvecType {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        #[cfg(dmirror_compile_fail)]
        let v = KVec::<u8>::with_capacity("16", GFP_KERNEL)?;
        #[cfg(not(dmirror_compile_fail))]
        let v = KVec::<u8>::with_capacity(16, GFP_KERNEL)?;
        pr_info!("capacity {}\n", v.capacity());
        Ok(SampleKvecType)
    }
}
