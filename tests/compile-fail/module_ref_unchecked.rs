// SPDX-License-Identifier: GPL-2.0
// expect: E0133

//! Keeping the module loaded without saying where the reference is given back: dropping it from the module's own code, with nothing else keeping the module, lets `rmmod` free the code still running, so taking one is `unsafe`.

use kernel::module::{ModuleRef, ThisModule};

/// Takes a reference to `module`.
pub fn misuse(module: &ThisModule, kept: Option<ModuleRef>) -> Option<ModuleRef> {
    #[cfg(dmirror_compile_fail)]
    return module.try_get();
    #[cfg(not(dmirror_compile_fail))]
    return kept.filter(|_| !module.as_ptr().is_null());
}
