//! CPU fault latencies: each fault of a `fault_seq` or `fault_rand` run timed on its own.
//!
//! A 4 KiB run reads the clock once a page and counts a page whose read took longer than
//! [`FAULT_NS`] as a fault (dmirror loaded with `fault_around` above 1 brings a window of pages
//! back per fault, and the reads after such a fault are plain memory reads); a THP run times the first read of each huge page,
//! the one that faults it back. Either way the run checks its count of faults against the
//! thread's fault counter (`getrusage`), so a misjudged read or a driver that splits the THP
//! fails the run instead of skewing the rows.

use crate::Res;
use dmirror_abi::uapi::PAGE;
use dmirror_suite::hmm::THP_PAGES;
use std::time::Instant;

/// A 4 KiB read that took longer than this was a fault: a read of a present page takes well
/// under a microsecond under TCG (up to 3 after a migration, whose TLB entries are gone), a
/// `migrate_to_ram` fault at least 10.
pub const FAULT_NS: u64 = 5_000;

/// Percentiles printed for the latency plot: 0, 1, ..., 99, then 99.9 and the maximum.
pub fn quantiles(sorted: &[u32]) -> Vec<u32> {
    let mut q: Vec<u32> = (0..100).map(|p| pct(sorted, p as f64)).collect();
    q.push(pct(sorted, 99.9));
    q.push(sorted.last().copied().unwrap_or(0));
    q
}

/// The nearest-rank percentile `p` of `sorted`.
pub fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The faults the calling thread has taken so far.
pub fn faults() -> u64 {
    // SAFETY: `getrusage` fills the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid `struct rusage` for the call.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    (u.ru_minflt + u.ru_majflt) as u64
}

/// Reads the marker word of each page of `addr` in `order`, timing the faults into `lat`
/// (cleared first); returns how many pages held the wrong data.
pub fn touch_timed(addr: usize, order: &[usize], stamp: u64, huge: bool, lat: &mut Vec<u32>) -> Res<usize> {
    let n = order.len();
    // Every page of both vectors is written before the run, so that neither faults in it.
    lat.clear();
    lat.resize(n, u32::MAX);
    lat.clear();
    let mut seen = vec![true; if huge { n.div_ceil(THP_PAGES) } else { 0 }];
    seen.fill(false);
    let read = |i: usize| {
        // SAFETY: `addr + i * PAGE` is a page of one of our read-write mappings.
        unsafe { std::ptr::read_volatile((addr + i * PAGE) as *const u64) }
    };
    let mut bad = 0;
    let before = faults();
    if huge {
        for &i in order {
            let h = i / THP_PAGES;
            let v = if seen[h] {
                read(i)
            } else {
                seen[h] = true;
                let t = Instant::now();
                let v = read(i);
                lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                v
            };
            bad += usize::from(v != stamp + i as u64);
        }
    } else {
        let mut prev = Instant::now();
        for &i in order {
            let v = read(i);
            let now = Instant::now();
            let ns = now.duration_since(prev).as_nanos() as u64;
            prev = now;
            if ns > FAULT_NS {
                lat.push(ns.min(u32::MAX as u64) as u32);
            }
            bad += usize::from(v != stamp + i as u64);
        }
    }
    let taken = faults() - before;
    let counted = lat.len() as u64;
    // A timer interrupt during a plain read makes it look like a fault: allow 5%.
    if taken > counted || counted - taken > 8 + taken / 20 {
        return Err(format!(
            "{counted} reads timed as faults, the fault counter says {taken}{}",
            if huge { " (a huge page split?)" } else { "" }
        ));
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u32> = (1..=200).collect();
        assert_eq!(pct(&v, 50.0), 100);
        assert_eq!(pct(&v, 99.0), 198);
        assert_eq!(pct(&v, 0.0), 1);
        let q = quantiles(&v);
        assert_eq!(q.len(), 102);
        assert_eq!((q[50], q[99], q[100], q[101]), (100, 198, 200, 200));
        assert_eq!(pct(&[], 50.0), 0);
    }
}
