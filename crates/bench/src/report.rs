//! The benchmark's report: `dmirror-perf` samples and the upstream selftest's
//! `benchmark_thp_migration` figures, turned into markdown tables, CSV files, a plot of
//! throughput against buffer size and one of the fault latency distributions.
//!
//! A sample line, as the guest prints it inside the `perf` suite's KTAP:
//! `# bench,<driver>,<workload>,<kind>,<bytes>,<rep>,<ns>`. The kernel memory and latency
//! lines are described in their modules.

mod conc;
mod kmem;
mod latency;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// The workloads in report order; the first six are plotted against size.
pub const WORKLOADS: &[&str] = &[
    "to_dev",
    "to_sys",
    "fault_seq",
    "fault_rand",
    "read",
    "write",
    "load",
    "unload",
    "conc_to_dev_1t",
    "conc_to_dev_2t1f",
    "conc_to_dev_2t2f",
    "conc_to_sys_1t",
    "conc_to_sys_2t1f",
    "conc_to_sys_2t2f",
    "conc_fault_1t",
    "conc_fault_2t1f",
    "conc_fault_2t2f",
];
const KINDS: &[&str] = &["4k", "thp", "-"];

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub driver: String,
    pub workload: String,
    pub kind: String,
    pub bytes: u64,
    pub rep: u32,
    pub ns: u64,
}

/// The samples in a KTAP text (other lines are ignored).
pub fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("# bench,"))
        .filter_map(|l| {
            let f: Vec<&str> = l.trim().split(',').collect();
            let [driver, workload, kind, bytes, rep, ns] = f.as_slice() else {
                return None;
            };
            Some(Sample {
                driver: driver.to_string(),
                workload: workload.to_string(),
                kind: kind.to_string(),
                bytes: bytes.parse().ok()?,
                rep: rep.parse().ok()?,
                ns: ns.parse().ok()?,
            })
        })
        .collect()
}

/// Median and spread of one driver's samples of a row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub median_ns: f64,
    pub min_ns: u64,
    pub max_ns: u64,
}

impl Stats {
    pub fn of(mut ns: Vec<u64>) -> Option<Stats> {
        if ns.is_empty() {
            return None;
        }
        ns.sort_unstable();
        let n = ns.len();
        let median_ns = if n % 2 == 1 {
            ns[n / 2] as f64
        } else {
            (ns[n / 2 - 1] + ns[n / 2]) as f64 / 2.0
        };
        Some(Stats {
            n,
            median_ns,
            min_ns: ns[0],
            max_ns: ns[n - 1],
        })
    }

    /// (max - min) / median.
    pub fn spread(&self) -> f64 {
        (self.max_ns - self.min_ns) as f64 / self.median_ns.max(1.0)
    }

    /// Bytes per second at the median, in GB/s (10^9).
    pub fn gbps(&self, bytes: u64) -> f64 {
        bytes as f64 / self.median_ns.max(1.0)
    }
}

/// Median and spread of values that are not times (bytes per page, latencies).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Val {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Val {
    pub fn of_f64(mut v: Vec<f64>) -> Option<Val> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Some(Val {
            n,
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// (max - min) / |median|.
    pub fn spread(&self) -> f64 {
        (self.max - self.min) / self.median.abs().max(1e-9)
    }
}

/// A ratio as the tables show it: bold below 1.00.
fn ratio_cell(r: Option<f64>) -> String {
    r.map_or("-".into(), |x| if x < 1.0 { format!("**{x:.2}**") } else { format!("{x:.2}") })
}

/// One row: a workload at one page kind and size, both drivers.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub workload: String,
    pub kind: String,
    pub bytes: u64,
    pub c: Option<Stats>,
    pub rust: Option<Stats>,
}

impl Row {
    /// C's median time over dmirror's: above 1.00, dmirror is faster.
    pub fn ratio(&self) -> Option<f64> {
        Some(self.c?.median_ns / self.rust?.median_ns.max(1.0))
    }
}

/// A row's key (workload and kind by their report order, bytes) and its C and dmirror samples.
type Grouped = BTreeMap<(usize, usize, u64), (Vec<u64>, Vec<u64>)>;

/// The rows, in workload, kind and size order, and the memcpy ceiling.
pub fn rows(samples: &[Sample]) -> (Vec<Row>, Option<(u64, Stats)>) {
    let mut by = Grouped::new();
    let mut memcpy = (0, Vec::new());
    for s in samples {
        if s.driver == "cpu" && s.workload == "memcpy" {
            memcpy.0 = s.bytes;
            memcpy.1.push(s.ns);
            continue;
        }
        let (Some(w), Some(k)) = (
            WORKLOADS.iter().position(|w| *w == s.workload),
            KINDS.iter().position(|k| *k == s.kind),
        ) else {
            continue;
        };
        let e = by.entry((w, k, s.bytes)).or_default();
        match s.driver.as_str() {
            "c" => e.0.push(s.ns),
            "rust" => e.1.push(s.ns),
            _ => {}
        }
    }
    let rows = by
        .into_iter()
        .map(|((w, k, bytes), (c, rust))| Row {
            workload: WORKLOADS[w].to_string(),
            kind: KINDS[k].to_string(),
            bytes,
            c: Stats::of(c),
            rust: Stats::of(rust),
        })
        .collect();
    (rows, Stats::of(memcpy.1).map(|s| (memcpy.0, s)))
}

/// One size of the upstream selftest's `benchmark_thp_migration`, in ms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub mb: f64,
    pub s2d_thp: f64,
    pub s2d_4k: f64,
    pub d2s_thp: f64,
    pub d2s_4k: f64,
}

/// The figures the selftest prints:
/// `=== <name> (<mb> MB) ===`, then `Sys->Dev Migration | <thp> ms | <4k> ms | ...`.
pub fn parse_upstream(text: &str) -> Vec<Upstream> {
    let mut out: Vec<Upstream> = Vec::new();
    for l in text.lines() {
        let l = l.trim_start_matches(['#', ' ']);
        if let Some(h) = l.strip_prefix("=== ").and_then(|h| h.strip_suffix(" ===")) {
            let (name, mb) = h.rsplit_once(" (").unwrap_or((h, ""));
            out.push(Upstream {
                name: name.to_string(),
                mb: mb.trim_end_matches(" MB)").parse().unwrap_or(0.0),
                ..Upstream::default()
            });
            continue;
        }
        let Some(u) = out.last_mut() else { continue };
        let f: Vec<&str> = l.split('|').map(str::trim).collect();
        if f.len() < 3 {
            continue;
        }
        let ms = |s: &str| s.trim_end_matches("ms").trim().parse::<f64>().unwrap_or(f64::NAN);
        match f[0] {
            "Sys->Dev Migration" => (u.s2d_thp, u.s2d_4k) = (ms(f[1]), ms(f[2])),
            "Dev->Sys Migration" => (u.d2s_thp, u.d2s_4k) = (ms(f[1]), ms(f[2])),
            _ => {}
        }
    }
    out
}

fn size(bytes: u64) -> String {
    if bytes == 0 {
        "-".into()
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

fn ms(s: &Option<Stats>) -> String {
    s.map_or("-".into(), |s| format!("{:.2} ±{:.0}%", s.median_ns / 1e6, s.spread() * 50.0))
}

/// The markdown report.
pub fn markdown(rows: &[Row], ceiling: Option<(u64, Stats)>, up_c: &[Upstream], up_rust: &[Upstream]) -> String {
    let mut o = String::new();
    let ceil_gbps = ceiling.map(|(b, s)| s.gbps(b));
    let _ = writeln!(o, "# dmirror.ko against test_hmm.ko\n");
    let _ = writeln!(
        o,
        "One guest boot under TCG: timings are only meaningful as ratios within it. \
         Median of the recorded samples (one a turn; below 32 MiB, 32 MiB / size a turn, at most \
         8) (± half the min-max spread, as a percentage of the median); \
         ratio = C's median time / dmirror's (above 1.00: dmirror is faster)."
    );
    if let (Some(g), Some((b, s))) = (ceil_gbps, ceiling) {
        let _ = writeln!(
            o,
            "\nCeiling: CPU `memcpy` of {} in the same guest, {g:.2} GB/s (n={}, ±{:.0}%).",
            size(b),
            s.n,
            s.spread() * 50.0
        );
    }
    let below = rows.iter().filter(|r| r.ratio().is_some_and(|x| x < 1.0)).count();
    let _ = writeln!(o, "\nRows with ratio below 1.00: {below} of {}.\n", rows.len());
    let _ = writeln!(
        o,
        "| workload | kind | size | C ms | dmirror ms | C GB/s | dmirror GB/s | dmirror / ceiling | ratio |"
    );
    let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let gb = |s: &Option<Stats>| match (s, r.bytes) {
            (Some(s), b) if b > 0 => format!("{:.3}", s.gbps(b)),
            _ => "-".into(),
        };
        let frac = match (r.rust, ceil_gbps, r.bytes) {
            (Some(s), Some(g), b) if b > 0 => format!("{:.1}%", 100.0 * s.gbps(b) / g),
            _ => "-".into(),
        };
        let ratio = ratio_cell(r.ratio());
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.workload,
            r.kind,
            size(r.bytes),
            ms(&r.c),
            ms(&r.rust),
            gb(&r.c),
            gb(&r.rust),
            frac,
            ratio
        );
    }
    if !up_c.is_empty() || !up_rust.is_empty() {
        let _ = writeln!(
            o,
            "\n## The upstream selftest's `benchmark_thp_migration` (device-private), ms\n\n\
             Its own figures (mean of 5 after one warm-up), each module loaded alone after ours.\n"
        );
        let _ = writeln!(
            o,
            "| size | S->D THP C | S->D THP dmirror | S->D 4K C | S->D 4K dmirror | D->S THP C | D->S THP dmirror | D->S 4K C | D->S 4K dmirror |"
        );
        let _ = writeln!(o, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let n = up_c.len().max(up_rust.len());
        for i in 0..n {
            let (c, r) = (up_c.get(i), up_rust.get(i));
            let mb = c.or(r).map_or(0.0, |u| u.mb);
            let f = |u: Option<&Upstream>, g: fn(&Upstream) -> f64| u.map_or("-".into(), |u| format!("{:.1}", g(u)));
            let _ = writeln!(
                o,
                "| {mb} MB | {} | {} | {} | {} | {} | {} | {} | {} |",
                f(c, |u| u.s2d_thp),
                f(r, |u| u.s2d_thp),
                f(c, |u| u.s2d_4k),
                f(r, |u| u.s2d_4k),
                f(c, |u| u.d2s_thp),
                f(r, |u| u.d2s_thp),
                f(c, |u| u.d2s_4k),
                f(r, |u| u.d2s_4k)
            );
        }
    }
    o
}

/// The rows as CSV.
pub fn csv(rows: &[Row], ceiling: Option<(u64, Stats)>) -> String {
    let ceil_gbps = ceiling.map(|(b, s)| s.gbps(b));
    let mut o = String::from(
        "workload,kind,bytes,c_n,c_median_ns,c_min_ns,c_max_ns,rust_n,rust_median_ns,rust_min_ns,rust_max_ns,c_gbps,rust_gbps,rust_ceiling_fraction,ratio\n",
    );
    let st = |s: &Option<Stats>| {
        s.map_or(",,,".into(), |s| format!("{},{:.0},{},{}", s.n, s.median_ns, s.min_ns, s.max_ns))
    };
    for r in rows {
        let gb = |s: &Option<Stats>| match s {
            Some(s) if r.bytes > 0 => format!("{:.4}", s.gbps(r.bytes)),
            _ => String::new(),
        };
        let frac = match (r.rust, ceil_gbps) {
            (Some(s), Some(g)) if r.bytes > 0 => format!("{:.4}", s.gbps(r.bytes) / g),
            _ => String::new(),
        };
        let _ = writeln!(
            o,
            "{},{},{},{},{},{},{},{},{}",
            r.workload,
            r.kind,
            r.bytes,
            st(&r.c),
            st(&r.rust),
            gb(&r.c),
            gb(&r.rust),
            frac,
            r.ratio().map_or(String::new(), |x| format!("{x:.4}"))
        );
    }
    o
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Throughput against size, one panel per workload, a line per driver and page kind.
pub fn plot(rows: &[Row], ceiling: Option<(u64, Stats)>, path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let font = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (scripts/setup installs fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| format!("{FONT}: not a font"))?;
    let err = |e: DrawingAreaErrorKind<_>| format!("plot: {e}");
    let root = BitMapBackend::new(path, (1500, 950)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (title, body) = root.split_vertically(40);
    title
        .titled(
            "dmirror.ko (Rust) against test_hmm.ko (C): throughput against buffer size, one boot (TCG)",
            ("sans-serif", 20),
        )
        .map_err(err)?;
    let ceil = ceiling.map(|(b, s)| s.gbps(b));
    let lines: [(&str, &str, RGBColor, &str); 4] = [
        ("c", "4k", RGBColor(230, 120, 0), "C 4K"),
        ("c", "thp", RGBColor(160, 60, 0), "C THP"),
        ("rust", "4k", RGBColor(40, 120, 220), "dmirror 4K"),
        ("rust", "thp", RGBColor(10, 40, 140), "dmirror THP"),
    ];
    for (area, w) in body.split_evenly((2, 3)).iter().zip(WORKLOADS) {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.workload == *w && r.bytes > 0).collect();
        let series = |driver: &str, kind: &str| -> Vec<(f64, f64)> {
            mine.iter()
                .filter(|r| r.kind == kind)
                .filter_map(|r| {
                    let s = if driver == "c" { r.c } else { r.rust }?;
                    Some(((r.bytes >> 20) as f64, s.gbps(r.bytes)))
                })
                .collect()
        };
        let spans = |driver: &str, kind: &str| -> Vec<(f64, f64, f64, f64)> {
            mine.iter()
                .filter(|r| r.kind == kind)
                .filter_map(|r| {
                    let s = if driver == "c" { r.c } else { r.rust }?;
                    let gb = |ns: f64| r.bytes as f64 / ns.max(1.0);
                    Some(((r.bytes >> 20) as f64, gb(s.max_ns as f64), s.gbps(r.bytes), gb(s.min_ns as f64)))
                })
                .collect()
        };
        let ymax = lines
            .iter()
            .flat_map(|(d, k, _, _)| spans(d, k))
            .map(|p| p.3)
            .fold(0.0f64, f64::max)
            .max(0.01)
            * 1.15;
        let xmax = mine.iter().map(|r| (r.bytes >> 20) as f64).fold(2.0, f64::max) * 1.3;
        // The ceiling is drawn where it fits the scale; where it does not, the caption says so.
        let caption = match ceil {
            Some(g) if g >= ymax => format!("{w} (memcpy ceiling {g:.2} GB/s: above the scale)"),
            _ => w.to_string(),
        };
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d((1.5f64..xmax).log_scale(), 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("buffer MiB")
            .y_desc("GB/s")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(err)?;
        for (d, k, color, label) in lines {
            let pts = series(d, k);
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart
                .draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 3, color.filled())))
                .map_err(err)?;
            // The samples' range: the slowest to the fastest.
            chart
                .draw_series(spans(d, k).into_iter().map(|(x, lo, mid, hi)| {
                    ErrorBar::new_vertical(x, lo, mid, hi, color.stroke_width(1), 6)
                }))
                .map_err(err)?;
        }
        if let Some(g) = ceil.filter(|g| *g < ymax) {
            chart
                .draw_series(LineSeries::new([(1.5, g), (xmax, g)], BLACK.mix(0.4)))
                .map_err(err)?
                .label("memcpy")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.4)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// A latency plot's line: its label, colour and (µs, percentile) points.
type Curve = (&'static str, plotters::style::RGBColor, Vec<(f64, f64)>);

/// The fault latency distributions: one panel per workload and page kind, the percentile
/// against the latency (log scale), a line per driver.
pub fn plot_latency(rows: &[latency::Row], path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: DrawingAreaErrorKind<_>| format!("plot: {e}");
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (title, body) = root.split_vertically(40);
    title
        .titled(
            "dmirror.ko (Rust) against test_hmm.ko (C): CPU fault latency (migrate_to_ram), one boot (TCG)",
            ("sans-serif", 20),
        )
        .map_err(err)?;
    // Two panels a line: 4 KiB and THP of each order.
    for (area, r) in body.split_evenly((rows.len().div_ceil(2), 2)).iter().zip(rows) {
        let series: Vec<Curve> = [
            ("C", RGBColor(230, 120, 0), &r.c),
            ("dmirror", RGBColor(40, 120, 220), &r.rust),
        ]
        .into_iter()
        .filter_map(|(l, c, p)| Some((l, c, p.as_ref()?.cdf().into_iter().map(|(p, us)| (us.max(0.1), p)).collect())))
        .collect();
        let (lo, hi) = series
            .iter()
            .flat_map(|s| s.2.iter().map(|p| p.0))
            .fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
        if hi <= 0.0 {
            continue;
        }
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} {}", r.workload, r.kind), ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0f64..100.5)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("latency per fault, µs")
            .y_desc("percentile")
            .x_labels(8)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(err)?;
        for (label, color, pts) in series {
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Writes `dir/bench/` from a bench run's files; returns the markdown.
pub fn write(dir: &Path) -> Result<String, String> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let samples = parse_samples(&read("perf.ktap"));
    if samples.is_empty() {
        return Err(format!("{}: no benchmark samples in perf.ktap", dir.display()));
    }
    let (rows, ceiling) = rows(&samples);
    let perf = read("perf.ktap");
    let kmem_rows = kmem::rows(&kmem::parse(&perf));
    let (turns, pooled) = latency::parse(&perf);
    let lat_rows = latency::rows(&turns, &pooled);
    let mut md = markdown(
        &rows,
        ceiling,
        &parse_upstream(&read("hmm-bench-c.ktap")),
        &parse_upstream(&read("hmm-bench-dmirror.ktap")),
    );
    md.push_str(&conc::markdown(&rows));
    md.push_str(&latency::markdown(&lat_rows));
    md.push_str(&kmem::markdown(&kmem_rows));
    let out = dir.join("bench");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let put = |name: &str, text: &str| std::fs::write(out.join(name), text).map_err(|e| format!("{name}: {e}"));
    put("bench.md", &md)?;
    put("bench.csv", &csv(&rows, ceiling))?;
    let mut raw = String::from("driver,workload,kind,bytes,rep,ns\n");
    for s in &samples {
        let _ = writeln!(raw, "{},{},{},{},{},{}", s.driver, s.workload, s.kind, s.bytes, s.rep, s.ns);
    }
    put("samples.csv", &raw)?;
    put("latency.csv", &latency::csv(&lat_rows))?;
    put("kmem.csv", &kmem::csv(&kmem_rows))?;
    plot(&rows, ceiling, &out.join("throughput.png"))?;
    if !lat_rows.is_empty() {
        plot_latency(&lat_rows, &out.join("latency.png"))?;
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KTAP: &str = "KTAP version 1\n\
        # bench,cpu,memcpy,-,1048576,0,1000\n\
        # bench,cpu,memcpy,-,1048576,1,3000\n\
        # bench,c,to_dev,4k,2097152,0,400\n\
        # bench,c,to_dev,4k,2097152,1,200\n\
        # bench,c,to_dev,4k,2097152,2,300\n\
        # bench,rust,to_dev,4k,2097152,0,100\n\
        # bench,rust,to_dev,4k,2097152,1,150\n\
        # bench,rust,load,-,0,0,50\n\
        # bench,rust,broken\n\
        ok 1 turn_0_c\n";

    #[test]
    fn samples_rows_and_ratio() {
        let s = parse_samples(KTAP);
        assert_eq!(s.len(), 8);
        let (rows, ceiling) = rows(&s);
        let (bytes, c) = ceiling.unwrap();
        assert_eq!((bytes, c.median_ns), (1048576, 2000.0));
        assert_eq!(rows.len(), 2);
        let r = &rows[0];
        assert_eq!((r.workload.as_str(), r.kind.as_str(), r.bytes), ("to_dev", "4k", 2097152));
        assert_eq!(r.c.unwrap().median_ns, 300.0);
        assert_eq!(r.rust.unwrap().median_ns, 125.0);
        assert_eq!(r.ratio(), Some(2.4));
        assert_eq!(rows[1].c, None);
        assert_eq!(rows[1].ratio(), None);
        let md = markdown(&rows, ceiling, &[], &[]);
        assert!(md.contains("| to_dev | 4k | 2 MiB |"), "{md}");
        assert!(md.contains("Rows with ratio below 1.00: 0 of 2."), "{md}");
        let csv = csv(&rows, ceiling);
        assert_eq!(csv.lines().count(), 3);
        assert!(csv.lines().nth(1).unwrap().ends_with(",2.4000"), "{csv}");
    }

    #[test]
    fn upstream_figures() {
        let text = "\n=== Two THP Size (4.0 MB) ===\n\
            \x20                    | With THP        | Without THP     | Improvement\n\
            Sys->Dev Migration   | 16.883 ms        | 19.744 ms        | 14.5%\n\
            Dev->Sys Migration   | 3.035 ms        | 4.276 ms        | 29.0%\n\
            S->D Throughput      | 0.23 GB/s      | 0.20 GB/s      | 16.9%\n";
        let u = parse_upstream(text);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].name, "Two THP Size");
        assert_eq!(u[0].mb, 4.0);
        assert_eq!((u[0].s2d_thp, u[0].s2d_4k, u[0].d2s_thp, u[0].d2s_4k), (16.883, 19.744, 3.035, 4.276));
    }
}
