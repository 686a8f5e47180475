//! The dmirror bench's host side: parsing what the guest printed and judging
//! it, and the compile-fail suite, which runs on the host.

pub mod accel;
pub mod compile_fail;
pub mod dmesg;
pub mod kcidb;
pub mod ktap;
pub mod mm;
pub mod regress;
pub mod report;
pub mod reuse;
pub mod stream;
pub mod verdict;
