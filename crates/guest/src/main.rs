//! `dmirror-guest`: the bench guest's runner. `qemu/init` mounts the file systems and hands
//! over to it; it runs the plan the kernel command line names (`dmirror.plan=`), then returns
//! for the init to power off.
//!
//! ```text
//! dmirror-guest                       run the plan of the command line
//! dmirror-guest suite NAME            one suite, its KTAP on standard output
//! dmirror-guest plans                 the plans and their suites
//! dmirror-guest mm-hmm-tests [--keep] ARG...
//! dmirror-guest ksm-numa 0|1
//! dmirror-guest mm-mremap
//! dmirror-guest mm-devdax-unbind      the mm selftests' wrapped programs (mm.rs)
//! ```
//!
//! Adding a suite: a function in [`suites`] (or a module of its own), its row in
//! [`suites::SUITES`], and a step in the plans of [`plan::PLANS`] that run it.

mod hmm;
mod mm;
mod plan;
mod suites;
mod sys;

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!(
        "usage: dmirror-guest [suite NAME | plans | mm-hmm-tests [--keep] ARG... | ksm-numa 0|1 | mm-mremap | mm-devdax-unbind]"
    );
    ExitCode::from(2)
}

fn status(rc: i32) -> ExitCode {
    ExitCode::from(u8::try_from(rc).unwrap_or(1))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        [] => match plan::run(&sys::arg("dmirror.plan").unwrap_or_default()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dmirror-guest: {e}");
                ExitCode::FAILURE
            }
        },
        ["suite", name] => match suites::run(name) {
            Some(rc) => status(rc),
            None => {
                eprintln!("dmirror-guest: unknown suite '{name}'");
                ExitCode::from(2)
            }
        },
        ["plans"] => {
            for (name, what, steps) in plan::PLANS {
                let names: Vec<String> = steps.iter().map(plan::Step::describe).collect();
                println!("{name:10} {what}\n{:10} {}", "", names.join(" "));
            }
            println!("mm-crash-N one of qemu/mm-selftests.crash on stock (dmirror.crash), meant to crash\n{:10} mm-crash", "");
            println!("shell      a shell on the console, for a person");
            ExitCode::SUCCESS
        }
        ["mm-hmm-tests", ..] => status(mm::hmm_tests(&args[1..])),
        ["ksm-numa", m] => status(mm::ksm_numa(m)),
        ["mm-mremap"] => status(mm::mremap()),
        ["mm-devdax-unbind"] => status(mm::devdax_unbind()),
        _ => usage(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_runs_a_known_suite() {
        for (plan, _, steps) in plan::PLANS {
            for s in *steps {
                assert!(
                    suites::SUITES.iter().any(|(n, _)| *n == s.suite),
                    "plan {plan}: no suite {}",
                    s.suite
                );
            }
        }
        assert!(
            plan::steps("mm-crash-3").is_some_and(|s| suites::SUITES.iter().any(|(n, _)| *n == s[0].suite))
        );
        assert!(plan::steps("nonesuch").is_none());
        // Every mm boot files its results under one name, crash boots too.
        for p in ["mm", "mm-stock", "mm-crash-1"] {
            assert!(plan::steps(p).is_some_and(|s| s.iter().all(|s| s.name == dmirror_abi::MM_SUITE)), "{p}");
        }
    }

    #[test]
    fn step_names_are_unique_within_a_plan() {
        for (plan, _, steps) in plan::PLANS {
            let mut names: Vec<&str> = steps.iter().map(|s| s.name).collect();
            names.sort_unstable();
            let n = names.len();
            names.dedup();
            assert_eq!(names.len(), n, "plan {plan}");
        }
    }
}
