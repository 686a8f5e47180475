//! Cases on the module as a whole.

use crate::harness::{Case, Ctx, Fail, Fixture, Variant, R};
use crate::hmm::{fill, verify, Dev, Map, PAGE};
use crate::inspect::{self, settled};
use crate::{ensure, ensure_eq};

pub const CASES: &[Case] = &[Case {
    name: "load_unload_50",
    fixture: Fixture::Module,
    timeout: 600,
    run: load_unload_50,
}];

/// 50 cycles of load, use every device, unload: each load starts with empty counters, the
/// pages come back on every unload, and nothing is left behind.
fn load_unload_50(ctx: &Ctx) -> R {
    let map = Map::anon(16 * PAGE)?;
    for cycle in 0..50u64 {
        let run = || -> R {
            if inspect::loaded() {
                inspect::unload()?;
            }
            inspect::load(ctx.config, &ctx.config.args)?;
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
    inspect::load(ctx.config, &ctx.config.args)
}
