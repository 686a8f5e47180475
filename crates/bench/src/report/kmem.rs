//! The kernel memory rows: what a buffer resident on the device (`dev`) and a mirrored one
//! (`read`) cost the kernel, per 4 KiB page, at two sizes, and the device memory's fixed cost
//! (`pool`).
//!
//! A sample line: `# kmem,<driver>,<what>,4k,<bytes>,<rep>,<total>,<slab>,<vmalloc>,<pagetables>`,
//! byte deltas of the kernel's memory across the operation.

use super::Val;
use std::collections::BTreeMap;
use std::fmt::Write as _;

const PAGE: f64 = 4096.0;

#[derive(Clone, Debug, PartialEq)]
pub struct Kmem {
    pub driver: String,
    pub what: String,
    pub bytes: u64,
    pub rep: u32,
    pub total: i64,
    pub slab: i64,
}

impl Kmem {
    fn pages(&self) -> f64 {
        self.bytes as f64 / PAGE
    }
}

/// The kernel memory samples in a KTAP text.
pub fn parse(text: &str) -> Vec<Kmem> {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("# kmem,"))
        .filter_map(|l| {
            let f: Vec<&str> = l.trim().split(',').collect();
            let [driver, what, _kind, bytes, rep, total, slab, _vmalloc, _pt] = f.as_slice() else {
                return None;
            };
            Some(Kmem {
                driver: driver.to_string(),
                what: what.to_string(),
                bytes: bytes.parse().ok()?,
                rep: rep.parse().ok()?,
                total: total.parse().ok()?,
                slab: slab.parse().ok()?,
            })
        })
        .collect()
}

/// One row of the table: a value per recorded turn of each driver (bytes per page, or bytes).
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub what: String,
    pub at: String,
    pub unit: &'static str,
    pub c: Option<Val>,
    pub rust: Option<Val>,
}

impl Row {
    /// C's over dmirror's: above 1.00, dmirror uses less. None unless both are positive.
    pub fn ratio(&self) -> Option<f64> {
        let (c, r) = (self.c?.median, self.rust?.median);
        (c > 0.0 && r > 0.0).then(|| c / r)
    }
}

/// The rows: for `dev` and `read`, bytes per page at each size and the slab part, the cost per
/// page between the two sizes (the slope), of which the part above one backing page for `dev`,
/// and the fixed cost (the intercept); then `pool`.
pub fn rows(samples: &[Kmem]) -> Vec<Row> {
    // (what, driver) -> rep -> samples in size order.
    let mut by: BTreeMap<(&str, &str), BTreeMap<u32, Vec<&Kmem>>> = BTreeMap::new();
    for s in samples {
        by.entry((s.what.as_str(), s.driver.as_str()))
            .or_default()
            .entry(s.rep)
            .or_default()
            .push(s);
    }
    for reps in by.values_mut() {
        for v in reps.values_mut() {
            v.sort_by_key(|s| s.bytes);
        }
    }
    let per_driver = |what: &str, f: &dyn Fn(&[&Kmem]) -> Option<f64>| -> (Option<Val>, Option<Val>) {
        let of = |d: &str| {
            let vals: Vec<f64> = by
                .get(&(what, d))
                .map(|reps| reps.values().filter_map(|v| f(v)).collect())
                .unwrap_or_default();
            Val::of_f64(vals)
        };
        (of("c"), of("rust"))
    };
    let sizes = |what: &str| -> Vec<u64> {
        let mut v: Vec<u64> = samples.iter().filter(|s| s.what == what).map(|s| s.bytes).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let mib = |b: u64| format!("{} MiB", b >> 20);
    let mut out = Vec::new();
    let mut push = |what: &str, at: String, unit, (c, rust): (Option<Val>, Option<Val>)| {
        out.push(Row {
            what: what.to_string(),
            at,
            unit,
            c,
            rust,
        })
    };
    for what in ["dev", "read"] {
        let sz = sizes(what);
        for &b in &sz {
            let at = |v: &[&Kmem]| find(v, b);
            push(what, mib(b), "B/page", per_driver(what, &|v| at(v).map(|s| s.total as f64 / s.pages())));
            push(what, format!("{}, slab", mib(b)), "B/page", per_driver(what, &|v| at(v).map(|s| s.slab as f64 / s.pages())));
        }
        if let [lo, .., hi] = sz[..] {
            let pair = |v: &[&Kmem]| Some((find(v, lo)?, find(v, hi)?));
            let slope = |a: &Kmem, b: &Kmem| (b.total - a.total) as f64 / (b.pages() - a.pages());
            let span = format!("{}->{}", mib(lo), mib(hi));
            push(what, format!("per page, {span}"), "B/page", per_driver(what, &|v| pair(v).map(|(a, b)| slope(&a, &b))));
            if what == "dev" {
                push(
                    what,
                    format!("per page above its backing page, {span}"),
                    "B/page",
                    per_driver(what, &|v| pair(v).map(|(a, b)| slope(&a, &b) - PAGE)),
                );
            }
            push(
                what,
                format!("fixed, {span}"),
                "KiB",
                per_driver(what, &|v| pair(v).map(|(a, b)| (a.total as f64 - slope(&a, &b) * a.pages()) / 1024.0)),
            );
        }
    }
    for b in sizes("pool") {
        push(
            "pool",
            mib(b),
            "KiB",
            per_driver("pool", &|v| find(v, b).map(|s| s.total as f64 / 1024.0)),
        );
    }
    out
}

/// The sample of `bytes` among one turn's.
fn find(v: &[&Kmem], bytes: u64) -> Option<Kmem> {
    v.iter().find(|s| s.bytes == bytes).map(|s| (*s).clone())
}

fn val(s: &Option<Val>) -> String {
    s.map_or("-".into(), |s| format!("{:.1} ±{:.0}%", s.median, s.spread() * 50.0))
}

/// The markdown section.
pub fn markdown(rows: &[Row]) -> String {
    let mut o = String::new();
    if rows.is_empty() {
        return o;
    }
    let below = rows.iter().filter(|r| r.ratio().is_some_and(|x| x < 1.0)).count();
    let _ = writeln!(
        o,
        "\n## Kernel memory\n\n\
         Kernel memory taken across the operation: the drop in free pages (buddy lists and every \
         CPU's page lists, `/proc/zoneinfo`, after `vm.stat_refresh` and two RCU grace periods) \
         minus user pages (`AnonPages`, `Cached`, `Buffers`); `slab` is the part in `Slab`. \
         `dev`: after MIGRATE_TO_DEV of that many 4 KiB pages (device-private data lives in a \
         system page per page in both drivers: the backing); `read`: after READ of system memory \
         (the mirror). `pool`: after the load and a round trip of the largest buffers, nothing \
         resident. Median over the turns (± half the spread); ratio = C / dmirror (above 1.00: \
         dmirror takes less).\n\nRows with ratio below 1.00: {below} of {}.\n",
        rows.iter().filter(|r| r.ratio().is_some()).count()
    );
    let _ = writeln!(o, "| what | at | unit | C | dmirror | ratio |");
    let _ = writeln!(o, "|---|---|---|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            r.what,
            r.at,
            r.unit,
            val(&r.c),
            val(&r.rust),
            super::ratio_cell(r.ratio())
        );
    }
    o
}

/// The rows as CSV.
pub fn csv(rows: &[Row]) -> String {
    let mut o = String::from("what,at,unit,c_n,c_median,c_min,c_max,rust_n,rust_median,rust_min,rust_max,ratio\n");
    let st = |s: &Option<Val>| s.map_or(",,,".into(), |s| format!("{},{:.2},{:.2},{:.2}", s.n, s.median, s.min, s.max));
    for r in rows {
        let _ = writeln!(
            o,
            "{},{},{},{},{},{}",
            r.what,
            r.at,
            r.unit,
            st(&r.c),
            st(&r.rust),
            r.ratio().map_or(String::new(), |x| format!("{x:.4}"))
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_page_slope_and_fixed() {
        // C: 8 KiB fixed and 4160 B a page; dmirror: 4 KiB fixed and 4104 B a page.
        let mut text = String::new();
        for rep in 0..2 {
            for (d, fixed, per) in [("c", 8192, 4160), ("rust", 4096, 4104)] {
                for pages in [4096i64, 16384] {
                    let t = fixed + per * pages;
                    let _ = writeln!(text, "# kmem,{d},dev,4k,{},{rep},{t},{},0,0", pages * 4096, pages * 64);
                }
            }
            let _ = writeln!(text, "# kmem,c,pool,4k,268435456,{rep},4194304,0,0,0");
            let _ = writeln!(text, "# kmem,rust,pool,4k,268435456,{rep},2097152,0,0,0");
        }
        text.push_str("# kmem,c,broken\n");
        let s = parse(&text);
        assert_eq!(s.len(), 12);
        let rows = rows(&s);
        let get = |at: &str| rows.iter().find(|r| r.at.starts_with(at)).unwrap();
        let slope = get("per page,");
        assert_eq!((slope.c.unwrap().median, slope.rust.unwrap().median), (4160.0, 4104.0));
        let meta = get("per page above");
        assert_eq!((meta.c.unwrap().median, meta.rust.unwrap().median), (64.0, 8.0));
        assert_eq!(meta.ratio(), Some(8.0));
        let fixed = get("fixed");
        assert_eq!((fixed.c.unwrap().median, fixed.rust.unwrap().median), (8.0, 4.0));
        let slab = get("16 MiB, slab");
        assert_eq!(slab.c.unwrap().median, 64.0);
        let pool = rows.iter().find(|r| r.what == "pool").unwrap();
        assert_eq!(pool.ratio(), Some(2.0));
        let md = markdown(&rows);
        assert!(md.contains("| dev | per page above its backing page, 16 MiB->64 MiB | B/page | 64.0 ±0% | 8.0 ±0% | 8.00 |"), "{md}");
        assert!(md.contains("Rows with ratio below 1.00: 0 of"), "{md}");
        assert_eq!(csv(&rows).lines().count(), rows.len() + 1);
    }
}
