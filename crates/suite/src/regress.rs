//! Regression tests for the refcount fixes of the kernel series: each fails on the stock
//! kernel (the series' Rust patches only) and passes on the patched one. `make test` runs them
//! on both kernels and reports the two columns.

use crate::dax::{map_shared, open_rw, probe_at, probe_pfn, with_devdax};
use crate::harness::{Case, Ctx, Fail, Fixture, Variant, R};
use crate::hmm::{fill, local_prot, verify, Dev, Map, Pipe, THP, THP_PAGES};
use crate::inspect::{settled, stats};
use crate::{diag, ensure, ensure_eq};
use dmirror_abi::uapi::{PAGE, PROT_DEV_MASK, PROT_PMD};

pub const CASES: &[Case] = &[
    Case {
        name: "referenced_coherent_page_not_collected",
        fixture: Fixture::Module,
        timeout: 60,
        run: referenced_coherent_page_not_collected,
    },
    Case {
        name: "free_page_refcount_zero",
        fixture: Fixture::DevDax,
        timeout: 120,
        run: devdax_free_page_refcount_zero,
    },
    // Last, and skipped on the stock kernel, where the split oopses and hangs the guest.
    Case {
        name: "split_coherent_thp_keeps_pgmap",
        fixture: Fixture::Module,
        timeout: 120,
        run: split_coherent_thp_keeps_pgmap,
    },
];

/// `migrate_vma_check_page()` must leave out a device folio that something besides the
/// migration holds a reference on, as it leaves out such a system folio. Stock 7.3 allows one
/// extra reference on every ZONE_DEVICE folio (a leftover of device pages being free at
/// refcount one), so a coherent page that a pipe references (vmsplice()) is collected: it is
/// unmapped, the driver allocates a destination and copies it, and only then does
/// `migrate_vma_pages()` (whose own count is exact) refuse to move it. The data is safe either
/// way; what the driver sees differs: dmirror counts such pages in `refused`.
fn referenced_coherent_page_not_collected(ctx: &Ctx) -> R {
    let v = Variant::Coherent;
    let path = format!("/dev/{}", v.device());
    if !std::path::Path::new(&path).exists() {
        return Err(Fail::Skip(format!("{path} missing: no coherent range given")));
    }
    let dev = Dev::open(&path)?;
    let map = Map::anon(PAGE)?;
    let seed = ctx.config.seed ^ 0x5eed;
    fill(map.bytes(), seed);
    ensure_eq!(dev.to_dev(map.addr, 1)?, 1, "pages migrated to the coherent device");
    let on_device = |what: &str| -> R<bool> {
        let s = dev.snapshot(map.addr, 1)?[0];
        diag!("{what}: snapshot {s:#x}");
        Ok(s & PROT_DEV_MASK == local_prot(true))
    };
    ensure!(on_device("after MIGRATE_TO_DEV")?, "page not in coherent device memory");
    settled(v, 1)?;

    let pipe = Pipe::new()?;
    ensure_eq!(pipe.vmsplice(map.addr, PAGE)?, PAGE, "bytes spliced into the pipe");
    let before = stats(v)?.get("refused");
    let moved = dev.to_sys(map.addr, 1)?;
    let refused = stats(v)?.get("refused") - before;
    let stayed = on_device("after MIGRATE_TO_SYS with the pipe's reference")?;
    diag!("MIGRATE_TO_SYS moved {moved} page(s); the driver copied {refused} page(s) for nothing");
    // The process writes its page; the pipe delivers what the page holds.
    fill(map.bytes(), seed ^ 1);
    let piped = pipe.read(PAGE)?;
    verify(&piped, seed ^ 1, "data the pipe delivers")?;
    ensure!(moved == 0 && stayed, "a coherent page referenced by a pipe was migrated");
    ensure_eq!(
        refused,
        0,
        "pages the core collected, had the driver copy, then refused to move (one reference \
         too many passed migrate_vma_check_page())"
    );
    // Without the pipe's reference the page migrates.
    ensure_eq!(dev.to_sys(map.addr, 1)?, 1, "pages migrated back once unreferenced");
    settled(v, 0)?;
    verify(map.bytes(), seed ^ 1, "the page back in system memory")
}

/// A device-DAX page nobody maps or references is free, and a free ZONE_DEVICE page has
/// refcount zero. Stock 7.3 keeps MEMORY_DEVICE_GENERIC pages "free at one": the count starts
/// at one and is set back to one whenever it drops to zero.
fn devdax_free_page_refcount_zero(ctx: &Ctx) -> R {
    with_devdax(|path| {
        let file = open_rw(path)?;
        let m = map_shared(&file, THP, libc::MAP_SHARED)?;
        fill(m.bytes(), ctx.config.seed ^ 0xd0);
        let (pfn, mapped) = probe_at(m.addr)?;
        ensure_eq!(mapped.kind.as_str(), "generic", "kind of a device-DAX page");
        diag!("mapped: refcount {}, folio order {}", mapped.folio_refcount, mapped.folio_order);
        drop(m);
        let idle = probe_pfn(pfn)?;
        diag!("unmapped: refcount {}, mapped {}", idle.folio_refcount, idle.folio_mapped);
        ensure!(!idle.folio_mapped, "still mapped after munmap: {idle:?}");
        ensure_eq!(idle.folio_refcount, 0, "refcount of a free device-DAX page");
        // And it can be handed out again: the data is still there.
        let m = map_shared(&file, THP, libc::MAP_SHARED)?;
        verify(m.bytes(), ctx.config.seed ^ 0xd0, "device-DAX data mapped again")?;
        ensure_eq!(probe_at(m.addr)?.1.folio_refcount, mapped.folio_refcount, "refcount mapped again");
        Ok(())
    })
}


/// A large device-coherent folio that the core splits keeps its pages linked to their pagemap.
/// Splitting clears, in each folio split off, the word that `folio->pgmap` shares, and stock 7.3
/// gives it back for device-private folios only: the first user of a split coherent page's
/// pgmap (the split's own remapping, the driver's eviction, the final free) dereferences NULL.
/// The split comes from debugfs's `split_huge_pages`, as the deferred-split shrinker's would
/// after a partial `munmap()`.
///
/// On the stock kernel the split oopses before the pgmap matters, in `lru_add_split_folio()`
/// (series patch 6), with interrupts off and the LRU lock held, and the guest hangs: the case
/// says SKIP there (the regression table shows it as not shown) instead of taking the stock run
/// down; running it by hand on that kernel shows the Oops.
fn split_coherent_thp_keeps_pgmap(ctx: &Ctx) -> R {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == "dmirror.plan=stock") {
        return Err(Fail::Skip(
            "the stock kernel oopses in lru_add_split_folio() splitting a coherent THP (series \
             patch 6) and hangs with the LRU lock held"
                .into(),
        ));
    }
    let v = Variant::Coherent;
    let path = format!("/dev/{}", v.device());
    if !std::path::Path::new(&path).exists() {
        return Err(Fail::Skip(format!("{path} missing: no coherent range given")));
    }
    // The file that migrates keeps references to the device pages in its mirror, and the core
    // does not split a folio with references it cannot account for: it is closed before the
    // split, and a second open file keeps the device memory (the last close evicts it).
    let keep = Dev::open(&path)?;
    let dev = Dev::open(&path)?;
    let map = Map::thp(THP)?;
    let seed = ctx.config.seed ^ 0x5b17;
    fill(map.bytes(), seed);
    ensure_eq!(dev.to_dev(map.addr, THP_PAGES)?, THP_PAGES as u64, "pages migrated to the device");
    let s = dev.snapshot(map.addr, 1)?[0];
    ensure!(
        s & PROT_PMD != 0 && s & PROT_DEV_MASK == local_prot(true),
        "not a coherent huge page mapped by a PMD: snapshot {s:#x}"
    );
    drop(dev);
    ensure_eq!(settled(v, THP_PAGES as u64)?.get("large_folios"), 1, "device THPs before the split");

    let request = format!("{},{:#x},{:#x}", std::process::id(), map.addr, map.addr + THP);
    std::fs::write("/sys/kernel/debug/split_huge_pages", &request)
        .map_err(|e| Fail::Fail(format!("split_huge_pages {request}: {e}")))?;
    let s = keep.snapshot(map.addr, 1)?[0];
    diag!("after the split: snapshot {s:#x}");
    ensure!(
        s & PROT_PMD == 0 && s & PROT_DEV_MASK == local_prot(true),
        "the huge page was not split in place: snapshot {s:#x}"
    );
    // `settled` also counts allocated folios that do not point at their pagemap.
    let after = settled(v, THP_PAGES as u64)?;
    ensure_eq!(after.get("large_folios"), 0, "device THPs after the split");
    verify(map.bytes(), seed, "the split pages, read by the CPU")?;

    // The last close evicts the device's memory: every split page comes back.
    drop(keep);
    settled(v, 0)?;
    verify(map.bytes(), seed, "the pages evicted to system memory")
}
