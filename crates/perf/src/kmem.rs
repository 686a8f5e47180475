//! Kernel memory, measured from the page allocator's free count and the kernel's page
//! counters.
//!
//! A [`Snap`] is taken after two RCU grace periods (`membarrier(MEMBARRIER_CMD_GLOBAL)`), so
//! that objects freed through RCU before it are back, after every slab cache was shrunk (its
//! empty slabs and CPU slabs given back, `/sys/kernel/slab/*/shrink`), so that the slab pages
//! counted are those holding live objects (up to one partial slab per cache and node), and
//! after `vm.stat_refresh` has folded every CPU's counter deltas into the global ones. Free memory is exact: the buddy
//! allocator's free pages plus every CPU's page lists, from `/proc/zoneinfo`. What the kernel
//! took between two snapshots is the drop in free memory minus what user space gained (anon
//! and file pages). A device-private page mapped in place of an anon page is counted as anon
//! (mm/rmap.c makes no exception for it) but is no system memory: the caller adds the bytes
//! it made device-resident back ([`Delta::resident`]).

use crate::Res;

/// Counters of one moment, in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snap {
    free: i64,
    anon: i64,
    user: i64,
    slab: i64,
    vmalloc: i64,
    page_tables: i64,
}

/// What the kernel took between two snapshots, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Delta {
    /// Every page the kernel took: the drop in free memory minus user pages.
    pub total: i64,
    /// Of which slab pages (`Slab`, large `kmalloc` included).
    pub slab: i64,
    /// Of which `vmalloc` pages.
    pub vmalloc: i64,
    /// Of which page tables.
    pub page_tables: i64,
    /// The change in `AnonPages`.
    pub anon: i64,
}

impl Delta {
    /// Accounts for `bytes` of anon memory that moved to device-private pages: `AnonPages`
    /// still counts them, but the system pages they were in went back to the free lists.
    pub fn resident(mut self, bytes: usize) -> Delta {
        self.total += bytes as i64;
        self
    }
}

impl Snap {
    /// Refreshes the counters and reads them.
    pub fn take() -> Res<Snap> {
        for _ in 0..2 {
            // SAFETY: A system call without pointers.
            let r = unsafe { libc::syscall(libc::SYS_membarrier, 1 /* GLOBAL */, 0, 0) };
            if r != 0 {
                return Err(crate::os_err("membarrier(GLOBAL)"));
            }
        }
        shrink_slabs()?;
        // Writing folds the per-CPU deltas; it fails with EINVAL when a counter is transiently
        // negative, after folding them all.
        let _ = std::fs::write("/proc/sys/vm/stat_refresh", "1");
        let zoneinfo = std::fs::read_to_string("/proc/zoneinfo").map_err(|e| format!("zoneinfo: {e}"))?;
        let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("meminfo: {e}"))?;
        let kb = |name: &str| -> Res<i64> {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
                .map(|v| v * 1024)
                .ok_or_else(|| format!("meminfo: no {name}"))
        };
        let page = 4096;
        Ok(Snap {
            free: free_pages(&zoneinfo)? * page,
            anon: kb("AnonPages")?,
            user: kb("AnonPages")? + kb("Cached")? + kb("Buffers")?,
            slab: kb("Slab")?,
            vmalloc: kb("VmallocUsed")?,
            page_tables: kb("PageTables")?,
        })
    }

    /// What the kernel took from `self` to `later`.
    pub fn to(&self, later: &Snap) -> Delta {
        Delta {
            total: (self.free - later.free) - (later.user - self.user),
            slab: later.slab - self.slab,
            vmalloc: later.vmalloc - self.vmalloc,
            page_tables: later.page_tables - self.page_tables,
            anon: later.anon - self.anon,
        }
    }
}

/// Gives every slab cache's empty slabs back to the page allocator.
fn shrink_slabs() -> Res {
    let dir = "/sys/kernel/slab";
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{dir}: {e}"))?;
    for e in entries.flatten() {
        // Merged caches are symbolic links to one directory: shrinking it twice is harmless.
        let _ = std::fs::write(e.path().join("shrink"), "1");
    }
    Ok(())
}

/// Free pages of every zone: the buddy lists (`pages free`) and the CPUs' page lists
/// (`count:` under `pagesets`).
fn free_pages(zoneinfo: &str) -> Res<i64> {
    let mut free = 0;
    let mut zones = 0;
    for l in zoneinfo.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["pages", "free", n] => {
                free += n.parse::<i64>().map_err(|e| format!("zoneinfo: {l}: {e}"))?;
                zones += 1;
            }
            ["count:", n] => free += n.parse::<i64>().map_err(|e| format!("zoneinfo: {l}: {e}"))?,
            _ => {}
        }
    }
    if zones == 0 {
        return Err("zoneinfo: no zone".into());
    }
    Ok(free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zoneinfo_free_and_pcp() {
        let z = "Node 0, zone      DMA\n  per-node stats\n      nr_inactive_anon 10\n  pages free     3\n        min      1\n  pagesets\n    cpu: 0\n              count: 0\n              high:  0\nNode 0, zone    DMA32\n  pages free     100\n  pagesets\n    cpu: 0\n              count: 7\n              high:  50\n    cpu: 1\n              count: 5\n";
        assert_eq!(free_pages(z).unwrap(), 115);
        assert!(free_pages("nothing").is_err());
    }
}
