//! Concurrency: MIGRATE_TO_DEV, MIGRATE_TO_SYS and CPU faults by one thread, and by two
//! threads at once on disjoint ranges, through one open file or through one file each (two
//! files of the same device).
//!
//! Each thread waits at a barrier, then times its own operation; a sample is the wall time
//! from the first thread's start to the last one's end, over the bytes of all threads.

use crate::{check, ioctl, placed, populate, Res, Turn};
use dmirror_abi::uapi::{MIGRATE_TO_DEV, MIGRATE_TO_SYS, PAGE};
use dmirror_suite::hmm::Dev;
use std::sync::Barrier;
use std::time::Instant;

/// The operation each thread runs on its range.
#[derive(Clone, Copy)]
enum Op {
    ToDev,
    ToSys,
    Fault,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::ToDev => "to_dev",
            Op::ToSys => "to_sys",
            Op::Fault => "fault",
        }
    }
}

/// The modes a sample names: one thread, two on one file, two on two files.
pub const MODES: [&str; 3] = ["1t", "2t1f", "2t2f"];

impl Turn<'_> {
    /// Every operation in every mode on `len` bytes a thread of the 4 KiB buffer; `devs` are
    /// two open files of the device.
    pub fn concurrency(&mut self, devs: [&Dev; 2], len: usize) -> Res {
        let buf = self.bufs.of(crate::Kind::Small);
        let n = len / PAGE;
        for op in [Op::ToDev, Op::ToSys, Op::Fault] {
            for (threads, files, mode) in [(1, 1, MODES[0]), (2, 1, MODES[1]), (2, 2, MODES[2])] {
                let at = format!("{} conc_{}_{mode}", self.driver.name(), op.name());
                let s = self.stamp();
                populate(buf, threads * len, s)?;
                // The file of thread `t`, and the start of its range.
                let dev = |t: usize| devs[if files == 2 { t } else { 0 }];
                let start = |t: usize| buf.addr + t * len;
                let mirror = |t: usize| self.bufs.mirror.addr + t * len;
                if !matches!(op, Op::ToDev) {
                    for t in 0..threads {
                        ioctl(dev(t), MIGRATE_TO_DEV, start(t), mirror(t), n, Some(n), &at)?;
                    }
                }
                let barrier = Barrier::new(threads);
                let workload = format!("conc_{}_{mode}", op.name());
                let profiled = self.profile_start(&workload, "4k");
                let spans = std::thread::scope(|sc| {
                    let hs: Vec<_> = (0..threads)
                        .map(|t| {
                            let (d, a, m, b, at) = (dev(t), start(t), mirror(t), &barrier, &at);
                            sc.spawn(move || -> Res<(Instant, Instant)> {
                                b.wait();
                                let t0 = Instant::now();
                                match op {
                                    Op::ToDev => ioctl(d, MIGRATE_TO_DEV, a, m, n, Some(n), at).map(|_| ())?,
                                    Op::ToSys => ioctl(d, MIGRATE_TO_SYS, a, 0, n, None, at).map(|_| ())?,
                                    Op::Fault => {
                                        let bad = crate::touch(a, 0..n, s + (t * n) as u64);
                                        if bad != 0 {
                                            return Err(format!("{at}: {bad} of {n} pages came back wrong"));
                                        }
                                    }
                                }
                                Ok((t0, Instant::now()))
                            })
                        })
                        .collect();
                    hs.into_iter()
                        .map(|h| h.join().map_err(|_| format!("{at}: thread panicked"))?)
                        .collect::<Res<Vec<_>>>()
                });
                self.profile_end(profiled, &workload, "4k", threads * len);
                let spans = spans?;
                let first = spans.iter().map(|s| s.0).min().ok_or("no thread")?;
                let last = spans.iter().map(|s| s.1).max().ok_or("no thread")?;
                let ns = last.duration_since(first).as_nanos() as u64;
                self.sample(&workload, "4k", threads * len, ns);
                let total = threads * n;
                match op {
                    Op::ToDev => {
                        placed(devs[0], buf.addr, total, true, &at)?;
                        check(self.bufs.mirror.addr, threads * len, s, &format!("{at} readback"))?;
                        ioctl(devs[0], MIGRATE_TO_SYS, buf.addr, 0, total, None, &at)?;
                    }
                    Op::ToSys | Op::Fault => placed(devs[0], buf.addr, total, false, &at)?,
                }
                check(buf.addr, threads * len, s, &at)?;
            }
        }
        Ok(())
    }
}
