//! dmirror-suite: the guest's zero-refcount test suite, kselftest style (KTAP on stdout).
//!
//! Run as root in the bench guest with dmirror.ko at hand:
//! `dmirror-suite [-l] [--regress] [-t NAME]... [--seed N] [--module KO] [--arg ARG]...`

use dmirror_suite::{badinput, dax, device, harness, module, regress};

fn main() {
    let cases: Vec<_> = device::CASES
        .iter()
        .chain(badinput::CASES)
        .chain(module::CASES)
        .chain(dax::CASES)
        .copied()
        .collect();
    std::process::exit(harness::main(&cases, regress::CASES))
}
