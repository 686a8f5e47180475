// SPDX-License-Identifier: GPL-2.0

//! dmirror: a simulated device with its own memory, on ZONE_DEVICE pages.
//!
//! This is the module skeleton the bench loads and unloads; the device
//! driver itself is built on top of it.

use kernel::prelude::*;

module! {
    type: Dmirror,
    name: "dmirror",
    authors: ["dmirror developers"],
    description: "Simulated device memory on zero-based ZONE_DEVICE refcounts",
    license: "GPL",
}

/// The module state.
struct Dmirror;

impl kernel::Module for Dmirror {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        pr_info!("loaded\n");
        Ok(Dmirror)
    }
}

impl Drop for Dmirror {
    fn drop(&mut self) {
        pr_info!("unloaded\n");
    }
}
