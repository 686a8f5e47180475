//! What the userspace crates of dmirror share, defined once: the ioctl ABI of
//! `lib/test_hmm_uapi.h` with each command's errno contract ([`uapi`]), the KTAP writer of the
//! guest programs and the host's compile-fail suite ([`ktap`]), and the words of a kernel
//! report in the kernel log ([`report`]), the guest's memory layout ([`layout`]).
//!
//! No dependencies: the host runner and the static guest binaries both build it.

pub mod ktap;
pub mod layout;
pub mod report;
pub mod uapi;

/// The suite under which every boot of the kernel's mm selftests files its results (the
/// guest's runner writes it, `dmirror-bench mm` reads it).
pub const MM_SUITE: &str = "mm-selftests";
