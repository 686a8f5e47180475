//! The guest's zero-refcount test suite as a library: its binary (`dmirror-suite`) runs the
//! cases; the fuzzer (`dmirror-fuzz`) and the benchmark (`dmirror-perf`) share its device
//! handle, buffers, data patterns and module helpers. The ioctl ABI is `dmirror-abi`'s.

pub mod badinput;
pub mod dax;
pub mod device;
pub mod harness;
pub mod hmm;
pub mod inspect;
pub mod module;
pub mod regress;
