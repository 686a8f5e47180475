// SPDX-License-Identifier: GPL-2.0

//! A module that warns on load when asked to: the bench's proof that its
//! dmesg scan catches a kernel warning and fails the run.

use kernel::prelude::*;

module! {
    type: BenchCanary,
    name: "bench_canary",
    authors: ["dmirror developers"],
    description: "Self-check of the dmirror bench's dmesg verdicts",
    license: "GPL",
    params: {
        warn: bool {
            default: false,
            description: "Emit a kernel warning on load",
        },
    },
}

/// The canary's (empty) state.
struct BenchCanary;

impl kernel::Module for BenchCanary {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        if module_parameters::warn.value() {
            kernel::warn_on!(true);
        }
        Ok(BenchCanary)
    }
}
