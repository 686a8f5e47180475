//! Cases on the module as a whole.

use crate::harness::{Case, Ctx, Fail, Fixture, Variant, R};
use crate::hmm::{fill, verify, Dev, Map};
use crate::inspect::{self, settled};
use crate::{ensure, ensure_eq};
use dmirror_abi::uapi::PAGE;

pub const CASES: &[Case] = &[Case {
    name: "load_unload",
    fixture: Fixture::Module,
    // The soak's 200 cycles on the debug kernel included.
    timeout: 1800,
    run: load_unload,
}];

/// Cycles of load, use every device, unload (20, or `--cycles N`): each load starts with
/// empty counters, the pages come back with their data on the last close, which leaves the
/// counters at zero again, and the unload leaves nothing behind.
fn load_unload(ctx: &Ctx) -> R {
    let map = Map::anon(16 * PAGE)?;
    let started = std::time::Instant::now();
    for cycle in 0..ctx.config.cycles {
        let run = || -> R {
            if inspect::loaded() {
                inspect::unload()?;
            }
            inspect::load(&ctx.config.module, &ctx.config.args)?;
            for v in [Variant::Private, Variant::Coherent] {
                let path = format!("/dev/{}", v.device());
                if !std::path::Path::new(&path).exists() {
                    continue;
                }
                let s = settled(v, 0)?;
                ensure_eq!(s.get("chunks"), 0, "chunks of a fresh device");
                let dev = Dev::open(&path)?;
                fill(map.bytes(), cycle);
                let n = dev.to_dev(map.addr, 16)?;
                ensure_eq!(n, 16, "pages migrated");
                settled(v, 16)?;
                drop(dev);
                verify(map.bytes(), cycle, "after the last close")?;
                // The last close evicted everything: the counters are back to zero.
                settled(v, 0)?;
            }
            inspect::unload()?;
            ensure!(!inspect::loaded(), "dmirror still listed after rmmod");
            ensure!(
                !std::path::Path::new("/sys/kernel/debug/dmirror").exists(),
                "debugfs directory left behind"
            );
            Ok(())
        };
        run().map_err(|e| match e {
            Fail::Fail(m) => Fail::Fail(format!("cycle {cycle}: {m}")),
            s => s,
        })?;
    }
    println!(
        "# {} cycles in {:.1} s",
        ctx.config.cycles,
        started.elapsed().as_secs_f64()
    );
    inspect::load(&ctx.config.module, &ctx.config.args)
}
