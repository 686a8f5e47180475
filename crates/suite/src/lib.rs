//! The guest's zero-refcount test suite as a library: its binary (`dmirror-suite`) runs the
//! cases; the benchmark (`dmirror-perf`) shares the ioctl ABI and the module helpers.

pub mod badinput;
pub mod dax;
pub mod device;
pub mod harness;
pub mod hmm;
pub mod inspect;
pub mod module;
pub mod regress;
