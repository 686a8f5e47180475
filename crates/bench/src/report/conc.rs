//! The concurrency rows' scaling: throughput of two threads on disjoint ranges over one
//! thread's, per driver and operation, through one open file (`2t1f`) and through two files
//! of the device (`2t2f`). The rows themselves (`conc_<op>_<mode>`) are in the main table.

use super::Row;
use std::fmt::Write as _;

/// The operations, in report order.
pub const OPS: &[&str] = &["to_dev", "to_sys", "fault"];

/// GB/s of `op` in `mode` for `driver` ("c" or "rust").
fn gbps(rows: &[Row], op: &str, mode: &str, driver: &str) -> Option<f64> {
    let w = format!("conc_{op}_{mode}");
    let r = rows.iter().find(|r| r.workload == w)?;
    let s = if driver == "c" { r.c } else { r.rust }?;
    Some(s.gbps(r.bytes))
}

/// The scaling factor of `mode` over one thread.
pub fn scaling(rows: &[Row], op: &str, mode: &str, driver: &str) -> Option<f64> {
    Some(gbps(rows, op, mode, driver)? / gbps(rows, op, "1t", driver)?)
}

pub fn markdown(rows: &[Row]) -> String {
    let mut o = String::new();
    if !rows.iter().any(|r| r.workload.starts_with("conc_")) {
        return o;
    }
    let _ = writeln!(
        o,
        "\n## Concurrency\n\n\
         Two threads on disjoint ranges of the 4 KiB buffer at once, each as much as the one \
         thread moves, through one open file (`2t1f`) or one file each (`2t2f`); the time is \
         from the first thread's start to the last one's end. Scaling = two threads' GB/s over \
         one thread's (2.00 is perfect on the guest's two vCPUs); the ratios of the rows are in \
         the table above.\n"
    );
    let _ = writeln!(
        o,
        "| operation | C 1 thread GB/s | C scaling, one file | C scaling, two files | dmirror 1 thread GB/s | dmirror scaling, one file | dmirror scaling, two files |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|");
    let f = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
    for op in OPS {
        let _ = writeln!(
            o,
            "| {op} | {} | {} | {} | {} | {} | {} |",
            f(gbps(rows, op, "1t", "c"), 3),
            f(scaling(rows, op, "2t1f", "c"), 2),
            f(scaling(rows, op, "2t2f", "c"), 2),
            f(gbps(rows, op, "1t", "rust"), 3),
            f(scaling(rows, op, "2t1f", "rust"), 2),
            f(scaling(rows, op, "2t2f", "rust"), 2),
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::super::{parse_samples, rows};
    use super::*;

    #[test]
    fn scaling_over_one_thread() {
        // One thread moves 8 MiB in 100 ns; two threads move 16 MiB in 125 (C) and 100 (dmirror).
        let text = "# bench,c,conc_to_dev_1t,4k,8388608,0,100\n\
            # bench,c,conc_to_dev_2t1f,4k,16777216,0,125\n\
            # bench,rust,conc_to_dev_1t,4k,8388608,0,100\n\
            # bench,rust,conc_to_dev_2t1f,4k,16777216,0,100\n";
        let (rows, _) = rows(&parse_samples(text));
        assert_eq!(rows.len(), 2);
        assert_eq!(scaling(&rows, "to_dev", "2t1f", "c"), Some(1.6));
        assert_eq!(scaling(&rows, "to_dev", "2t1f", "rust"), Some(2.0));
        assert_eq!(scaling(&rows, "to_sys", "2t1f", "rust"), None);
        let md = markdown(&rows);
        assert!(md.contains("| to_dev | 83886.080 | 1.60 | - | 83886.080 | 2.00 | - |"), "{md}");
    }
}
