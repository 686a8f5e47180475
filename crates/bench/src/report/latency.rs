//! The CPU fault latency rows: p50, p99 and the maximum of every timed fault of the recorded
//! turns, per driver, workload (`fault_seq`, `fault_rand`) and page kind, with the spread of
//! each turn's own percentiles.
//!
//! Sample lines: `# lat,<driver>,<workload>,<kind>,<rep>,<n>,<p50>,<p99>,<max>` per turn and
//! `# latq,<driver>,<workload>,<kind>,<n>,<q0;q1;...;q99;q99.9;max>` over all turns, in ns.

use super::Val;
use std::fmt::Write as _;

/// One turn's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    pub driver: String,
    pub workload: String,
    pub kind: String,
    pub n: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// All turns' quantiles.
#[derive(Clone, Debug, PartialEq)]
pub struct Pooled {
    pub driver: String,
    pub workload: String,
    pub kind: String,
    pub n: u64,
    /// Percentiles 0 to 99, then 99.9 and the maximum, in ns.
    pub q: Vec<u64>,
}

impl Pooled {
    pub fn p50(&self) -> u64 {
        self.q[50]
    }
    pub fn p99(&self) -> u64 {
        self.q[99]
    }
    pub fn max(&self) -> u64 {
        self.q[101]
    }
    /// (percentile, µs) points of the distribution.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        self.q
            .iter()
            .enumerate()
            .map(|(i, &ns)| {
                let p = match i {
                    100 => 99.9,
                    101 => 100.0,
                    _ => i as f64,
                };
                (p, ns as f64 / 1e3)
            })
            .collect()
    }
}

pub fn parse(text: &str) -> (Vec<Turn>, Vec<Pooled>) {
    let mut turns = Vec::new();
    let mut pooled = Vec::new();
    for l in text.lines().map(str::trim_start) {
        if let Some(l) = l.strip_prefix("# lat,") {
            let f: Vec<&str> = l.trim().split(',').collect();
            let [d, w, k, _rep, n, p50, p99, max] = f.as_slice() else { continue };
            let num = |s: &str| s.parse::<u64>().ok();
            let (Some(n), Some(p50), Some(p99), Some(max)) = (num(n), num(p50), num(p99), num(max)) else {
                continue;
            };
            turns.push(Turn {
                driver: d.to_string(),
                workload: w.to_string(),
                kind: k.to_string(),
                n,
                p50,
                p99,
                max,
            });
        } else if let Some(l) = l.strip_prefix("# latq,") {
            let f: Vec<&str> = l.trim().split(',').collect();
            let [d, w, k, n, q] = f.as_slice() else { continue };
            let q: Option<Vec<u64>> = q.split(';').map(|v| v.parse().ok()).collect();
            let (Ok(n), Some(q)) = (n.parse(), q) else { continue };
            if q.len() != 102 {
                continue;
            }
            pooled.push(Pooled {
                driver: d.to_string(),
                workload: w.to_string(),
                kind: k.to_string(),
                n,
                q,
            });
        }
    }
    (turns, pooled)
}

/// One row: a workload and kind, both drivers.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub workload: String,
    pub kind: String,
    pub c: Option<Pooled>,
    pub rust: Option<Pooled>,
    /// The spread of the turns' p50, p99 and max, per driver.
    pub c_turns: [Option<Val>; 3],
    pub rust_turns: [Option<Val>; 3],
}

impl Row {
    /// C's over dmirror's figure `f` (above 1.00: dmirror's faults are faster).
    pub fn ratio(&self, f: fn(&Pooled) -> u64) -> Option<f64> {
        let (c, r) = (f(self.c.as_ref()?), f(self.rust.as_ref()?));
        (r > 0).then(|| c as f64 / r as f64)
    }
}

pub fn rows(turns: &[Turn], pooled: &[Pooled]) -> Vec<Row> {
    let order = |w: &str, k: &str| (k != "4k", w != "fault_seq", w.to_string(), k.to_string());
    let mut keys: Vec<_> = pooled.iter().map(|p| order(&p.workload, &p.kind)).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|(_, _, w, k)| {
            let find = |d: &str| pooled.iter().find(|p| p.driver == d && p.workload == w && p.kind == k).cloned();
            let spread = |d: &str| -> [Option<Val>; 3] {
                let mine: Vec<&Turn> = turns.iter().filter(|t| t.driver == d && t.workload == w && t.kind == k).collect();
                let of = |f: fn(&Turn) -> u64| Val::of_f64(mine.iter().map(|t| f(t) as f64).collect());
                [of(|t| t.p50), of(|t| t.p99), of(|t| t.max)]
            };
            Row {
                c: find("c"),
                rust: find("rust"),
                c_turns: spread("c"),
                rust_turns: spread("rust"),
                workload: w,
                kind: k,
            }
        })
        .collect()
}

/// The figure of all turns in µs, ± half the spread of the turns' own figures.
fn cell(p: &Option<Pooled>, turns: &Option<Val>, f: fn(&Pooled) -> u64) -> String {
    match (p, turns) {
        (Some(p), Some(t)) => format!("{:.1} ±{:.0}%", f(p) as f64 / 1e3, t.spread() * 50.0),
        (Some(p), None) => format!("{:.1}", f(p) as f64 / 1e3),
        _ => "-".into(),
    }
}

pub fn markdown(rows: &[Row]) -> String {
    let mut o = String::new();
    if rows.is_empty() {
        return o;
    }
    let figs: [fn(&Pooled) -> u64; 3] = [Pooled::p50, Pooled::p99, Pooled::max];
    let below = rows
        .iter()
        .flat_map(|r| figs.iter().map(|f| r.ratio(*f)))
        .filter(|x| x.is_some_and(|x| x < 1.0))
        .count();
    let _ = writeln!(
        o,
        "\n## CPU fault latency\n\n\
         Every CPU fault (`migrate_to_ram`) of the recorded `fault_seq` and `fault_rand` runs, \
         timed on its own, pooled over the turns, in µs (± half the spread of the turns' own \
         figures); `faults` counts them (dmirror's `fault_around` window, one page by default like \
         C's, would make it take fewer). Ratio = C / dmirror (above 1.00: dmirror's faults are faster).\n\n\
         Ratios below 1.00: {below} of {}.\n",
        3 * rows.len()
    );
    let _ = writeln!(
        o,
        "| workload | kind | C faults | dmirror faults | C p50 | dmirror p50 | ratio | C p99 | dmirror p99 | ratio | C max | dmirror max | ratio |"
    );
    let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let n = |p: &Option<Pooled>| p.as_ref().map_or("-".into(), |p| p.n.to_string());
        let mut line = format!("| {} | {} | {} | {} |", r.workload, r.kind, n(&r.c), n(&r.rust));
        for (i, f) in figs.iter().enumerate() {
            let _ = write!(
                line,
                " {} | {} | {} |",
                cell(&r.c, &r.c_turns[i], *f),
                cell(&r.rust, &r.rust_turns[i], *f),
                super::ratio_cell(r.ratio(*f))
            );
        }
        let _ = writeln!(o, "{line}");
    }
    o
}

pub fn csv(rows: &[Row]) -> String {
    let mut o = String::from("workload,kind,c_faults,rust_faults,c_p50_ns,rust_p50_ns,c_p99_ns,rust_p99_ns,c_max_ns,rust_max_ns,ratio_p50,ratio_p99,ratio_max\n");
    let f = |p: &Option<Pooled>, g: fn(&Pooled) -> u64| p.as_ref().map_or(String::new(), |p| g(p).to_string());
    let x = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.4}"));
    for r in rows {
        let _ = writeln!(
            o,
            "{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.workload,
            r.kind,
            f(&r.c, |p| p.n),
            f(&r.rust, |p| p.n),
            f(&r.c, Pooled::p50),
            f(&r.rust, Pooled::p50),
            f(&r.c, Pooled::p99),
            f(&r.rust, Pooled::p99),
            f(&r.c, Pooled::max),
            f(&r.rust, Pooled::max),
            x(r.ratio(Pooled::p50)),
            x(r.ratio(Pooled::p99)),
            x(r.ratio(Pooled::max)),
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(scale: u64) -> String {
        (0..102u64).map(|i| (1000 + i * scale).to_string()).collect::<Vec<_>>().join(";")
    }

    #[test]
    fn rows_from_turns_and_pooled() {
        let text = format!(
            "# lat,c,fault_seq,4k,0,100,2000,4000,9000\n\
             # lat,c,fault_seq,4k,1,100,2200,4400,9900\n\
             # lat,rust,fault_seq,4k,0,10,1000,2000,3000\n\
             # latq,c,fault_seq,4k,200,{}\n\
             # latq,rust,fault_seq,4k,10,{}\n\
             # latq,rust,fault_rand,thp,10,{}\n\
             # latq,rust,fault_rand,thp,10,1;2\n",
            q(20),
            q(10),
            q(1)
        );
        let (turns, pooled) = parse(&text);
        assert_eq!((turns.len(), pooled.len()), (3, 3));
        let rows = rows(&turns, &pooled);
        assert_eq!(rows.len(), 2);
        let r = &rows[0];
        assert_eq!((r.workload.as_str(), r.kind.as_str()), ("fault_seq", "4k"));
        assert_eq!(r.c.as_ref().unwrap().p50(), 2000);
        assert_eq!(r.rust.as_ref().unwrap().p99(), 1990);
        assert_eq!(r.ratio(Pooled::p50), Some(2000.0 / 1500.0));
        assert_eq!(r.c_turns[0].unwrap().median, 2100.0);
        assert_eq!(rows[1].ratio(Pooled::p50), None);
        let md = markdown(&rows);
        assert!(md.contains("| fault_seq | 4k | 200 | 10 | 2.0 ±5% | 1.5 ±0% | 1.33 |"), "{md}");
        assert!(md.contains("Ratios below 1.00: 0 of 6."), "{md}");
        assert_eq!(csv(&rows).lines().count(), 3);
        assert_eq!(r.c.as_ref().unwrap().cdf()[100], (99.9, 3.0));
    }
}
