//! Cases on dmirror's device memory, run against each device kind: the refcount contract,
//! data integrity, fork, unmapping and remapping, concurrency, memory pressure, teardown.

use crate::harness::{Case, Ctx, Fail, Fixture, Variant, R};
use crate::hmm::{fill, local_prot, verify, verify_zero, Dev, Map, Pipe, Rng, THP, THP_PAGES};
use crate::inspect::{self, settled, stats};
use crate::{diag, ensure, ensure_eq};
use dmirror_abi::uapi::{self, PAGE};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

pub const CASES: &[Case] = &[
    case("idle_counters", 30, idle_counters),
    case("migrate_pages_counted", 60, migrate_pages_counted),
    case("migrate_thp_counted", 60, migrate_thp_counted),
    case("exit_frees_all", 60, exit_frees_all),
    case("data_random_pages", 120, data_random_pages),
    case("data_random_thp", 120, data_random_thp),
    case("data_partial_ranges", 60, data_partial_ranges),
    case("data_holes", 60, data_holes),
    case("data_read_only", 60, data_read_only),
    case("data_prot_none", 60, data_prot_none),
    case("fork_cow_both_write", 120, fork_cow_both_write),
    case("fork_child_migrates", 60, fork_child_migrates),
    case("fork_device_write_breaks_cow", 60, fork_device_write),
    case("fork_shared_thp_single_pages", 60, fork_shared_thp_single_pages),
    case("shmem_thp_stays", 60, shmem_thp_stays),
    case("munmap_on_device", 60, munmap_on_device),
    case("munmap_half_thp", 60, munmap_half_thp),
    case("mremap_move", 60, mremap_move),
    case("mremap_dontunmap", 60, mremap_dontunmap),
    case("madvise_dontneed", 60, madvise_dontneed),
    case("madvise_free", 60, madvise_free),
    case("to_dev_races_dontneed", 120, to_dev_races_dontneed),
    case("exclusive_races_dontneed", 60, exclusive_races_dontneed),
    case("concurrent_migrate_fault_fork", 180, concurrent),
    case("cpu_fault_window", 120, cpu_fault_window),
    case("capacity_enomem", 300, capacity_enomem),
    case("fail_alloc_every_path", 120, fail_alloc_every_path),
    case("fail_alloc_mid_window", 180, fail_alloc_mid_window),
    case("kill_mid_migration", 180, kill_mid_migration),
    case("last_close_with_pages", 60, last_close_with_pages),
    case("release_with_pages", 60, release_with_pages),
    case("rmmod_with_pages", 120, rmmod_with_pages),
    case("release_with_spliced_page", 60, release_with_spliced_page),
    Case {
        name: "coherent_last_ref_in_irq",
        fixture: Fixture::Module,
        timeout: 60,
        run: coherent_last_ref_in_irq,
    },
];

const fn case(name: &'static str, timeout: u64, run: fn(&Ctx) -> R) -> Case {
    Case {
        name,
        fixture: Fixture::Device,
        timeout,
        run,
    }
}

/// The seed of one case's patterns: the run's seed mixed with the case's name.
fn seed(ctx: &Ctx, salt: &str) -> u64 {
    salt.bytes().fold(ctx.config.seed ^ 0x9e37_79b9_7f4a_7c15, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn coherent(ctx: &Ctx) -> bool {
    ctx.variant() == Variant::Coherent
}

/// Asserts that SNAPSHOT shows exactly the pages in `on` in this device's memory.
fn on_device(ctx: &Ctx, dev: &Dev, map: &Map, on: impl Fn(usize) -> bool) -> R {
    let snap = dev.snapshot(map.addr, map.npages())?;
    let want = local_prot(coherent(ctx));
    for (i, &s) in snap.iter().enumerate() {
        let here = s & uapi::PROT_DEV_MASK == want;
        ensure!(
            here == on(i),
            "page {i}: snapshot {s:#x}, expected {}in device memory",
            if on(i) { "" } else { "not " }
        );
    }
    Ok(())
}

/// Migrates the whole map to the device and asserts that all of it went.
fn to_dev_all(dev: &Dev, map: &Map) -> R {
    let n = dev
        .to_dev(map.addr, map.npages())
        .map_err(|e| Fail::Fail(format!("MIGRATE_TO_DEV of {} pages: {e}", map.npages())))?;
    ensure_eq!(n, map.npages() as u64, "pages migrated to the device");
    Ok(())
}

fn idle_counters(ctx: &Ctx) -> R {
    let _dev = Dev::open(&ctx.path())?;
    let s = settled(ctx.variant(), 0)?;
    ensure_eq!(s.kind(), ctx.variant().name(), "device kind");
    ensure_eq!(s.get("free"), s.get("pages"), "free pages of an idle device");
    ensure_eq!(s.get("large_folios") + s.get("small_folios"), 0, "folios");
    Ok(())
}

fn migrate_pages_counted(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(64 * PAGE)?;
    let seed = seed(ctx, "pages");
    fill(map.bytes(), seed);
    to_dev_all(&dev, &map)?;
    on_device(ctx, &dev, &map, |_| true)?;
    let s = settled(ctx.variant(), 64)?;
    ensure_eq!(s.get("small_folios"), 64, "order-0 device folios");
    ensure!(s.get("chunks") >= 1, "no chunk registered: {s:?}");
    // Migrating again moves nothing and allocates nothing.
    to_dev_all(&dev, &map)?;
    settled(ctx.variant(), 64)?;
    let back = dev.to_sys(map.addr, 64)?;
    ensure_eq!(back, 64, "pages migrated back");
    settled(ctx.variant(), 0)?;
    verify(map.bytes(), seed, "after MIGRATE_TO_SYS")
}

fn migrate_thp_counted(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::thp(THP)?;
    let seed = seed(ctx, "thp");
    fill(map.bytes(), seed);
    to_dev_all(&dev, &map)?;
    let s = settled(ctx.variant(), THP_PAGES as u64)?;
    if s.get("large_folios") == 0 {
        return Err(Fail::Skip(
            "no THP for the source buffer (transparent_hugepage not available)".into(),
        ));
    }
    ensure_eq!(s.get("large_folios"), 1, "device THPs");
    ensure_eq!(s.get("large_pages"), THP_PAGES as u64, "pages in device THPs");
    let snap = dev.snapshot(map.addr, 1)?;
    ensure!(snap[0] & uapi::PROT_PMD != 0, "device THP not PMD-mapped: {:#x}", snap[0]);
    // A CPU read of one byte brings the whole folio back (coherent memory is read in place).
    verify(map.bytes(), seed, "CPU read of the device THP")?;
    if !coherent(ctx) {
        settled(ctx.variant(), 0)?;
    } else {
        dev.to_sys(map.addr, THP_PAGES)?;
        settled(ctx.variant(), 0)?;
    }
    verify(map.bytes(), seed, "back in system memory")
}

/// Forks a child that waits while `parent` runs, then exits with status 0 if `child` returns
/// true: the child sees the memory it shares with the parent after the parent's work. Returns
/// what `parent` returned and whether the child exited with status 0.
fn child_after<T>(child: impl FnOnce() -> bool, parent: impl FnOnce() -> T) -> R<(T, bool)> {
    let pipe = Pipe::new()?;
    // SAFETY: The child waits for a byte, checks its own view and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if pid == 0 {
        let ok = pipe.read(1).is_ok() && child();
        // SAFETY: Ends the child.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let out = parent();
    let signalled = pipe.signal();
    let mut status = 0;
    // SAFETY: Waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    signalled?;
    Ok((out, libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0))
}

/// Runs `f` in a forked child; returns whether it exited with status 0.
fn in_child(f: impl FnOnce() -> R) -> R<bool> {
    // SAFETY: The child runs `f` and exits; the parent only waits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if pid == 0 {
        let code = match f() {
            Ok(()) => 0,
            Err(Fail::Fail(m)) | Err(Fail::Skip(m)) => {
                diag!("child: {m}");
                1
            }
        };
        // SAFETY: Ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: Waits for our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Ok(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0)
}

fn exit_frees_all(ctx: &Ctx) -> R {
    // Held open here, so the chunks stay and their counters are there to read.
    let _dev = Dev::open(&ctx.path())?;
    let path = ctx.path();
    let ok = in_child(|| {
        let dev = Dev::open(&path)?;
        let pages = Map::anon(128 * PAGE)?;
        let huge = Map::thp(THP)?;
        fill(pages.bytes(), 1);
        fill(huge.bytes(), 2);
        to_dev_all(&dev, &pages)?;
        to_dev_all(&dev, &huge)?;
        // Exits with everything on the device, without unmapping or closing anything.
        pages.forget();
        huge.forget();
        std::mem::forget(dev);
        Ok(())
    })?;
    ensure!(ok, "the child could not migrate its pages");
    let s = settled(ctx.variant(), 0)?;
    ensure!(s.get("chunks") >= 1, "the chunks went away: {s:?}");
    Ok(())
}

/// Migrates `map` to the device and back, by MIGRATE_TO_SYS and by CPU faults, with a new
/// random pattern each round, verified byte for byte through the device and the CPU.
fn round_trips(ctx: &Ctx, map: &Map, salt: &str) -> R {
    let dev = Dev::open(&ctx.path())?;
    let npages = map.npages();
    for round in 0..3u64 {
        let seed = seed(ctx, salt) ^ round;
        fill(map.bytes(), seed);
        to_dev_all(&dev, map)?;
        settled(ctx.variant(), npages as u64)?;
        verify(&dev.read(map.addr, npages)?, seed, "device read of the migrated pages")?;
        if round % 2 == 0 {
            let back = dev.to_sys(map.addr, npages)?;
            ensure_eq!(back, npages as u64, "round {round}: pages migrated back");
        } else {
            // A random page order: each CPU fault migrates one page (or folio) back.
            let mut order: Vec<usize> = (0..npages).collect();
            let mut r = Rng::new(seed);
            for i in (1..order.len()).rev() {
                order.swap(i, r.below(i as u64 + 1) as usize);
            }
            for &p in &order {
                let b = map.bytes()[p * PAGE + (p % PAGE)];
                std::hint::black_box(b);
            }
            if coherent(ctx) {
                dev.to_sys(map.addr, npages)?;
            }
        }
        settled(ctx.variant(), 0)?;
        verify(map.bytes(), seed, &format!("round {round}, back in system memory"))?;
    }
    Ok(())
}

fn data_random_pages(ctx: &Ctx) -> R {
    round_trips(ctx, &Map::anon(256 * PAGE)?, "random_pages")
}

fn data_random_thp(ctx: &Ctx) -> R {
    round_trips(ctx, &Map::thp(2 * THP)?, "random_thp")
}

fn data_partial_ranges(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(64 * PAGE)?;
    let seed = seed(ctx, "partial");
    fill(map.bytes(), seed);
    ensure_eq!(dev.to_dev(map.page(8), 16)?, 16, "pages 8..24 migrated");
    ensure_eq!(dev.to_dev(map.page(40), 1)?, 1, "page 40 migrated");
    on_device(ctx, &dev, &map, |i| (8..24).contains(&i) || i == 40)?;
    settled(ctx.variant(), 17)?;
    // Back part of it, then the rest through the CPU.
    ensure_eq!(dev.to_sys(map.page(16), 8)?, 8, "pages 16..24 migrated back");
    on_device(ctx, &dev, &map, |i| (8..16).contains(&i) || i == 40)?;
    settled(ctx.variant(), 9)?;
    verify(map.bytes(), seed, "whole range")?;
    if coherent(ctx) {
        dev.to_sys(map.addr, 64)?;
    }
    settled(ctx.variant(), 0).map(|_| ())
}

fn data_holes(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(64 * PAGE)?;
    let seed = seed(ctx, "holes");
    // Even pages hold data; odd pages were never touched (no page at all yet).
    let mut want = vec![0u8; map.len];
    fill(&mut want, seed);
    for p in (0..64).filter(|p| p % 2 == 1) {
        want[p * PAGE..(p + 1) * PAGE].fill(0);
    }
    for p in (0..64).step_by(2) {
        map.bytes()[p * PAGE..(p + 1) * PAGE].copy_from_slice(&want[p * PAGE..(p + 1) * PAGE]);
    }
    to_dev_all(&dev, &map)?;
    settled(ctx.variant(), 64)?;
    ensure!(dev.read(map.addr, 64)? == want, "device read differs from the data");
    // A range with an unmapped hole: EINVAL, nothing lost on either side.
    dev.to_sys(map.addr, 64)?;
    // SAFETY: Unmaps pages 16..32 of our own mapping.
    unsafe { libc::munmap(map.page(16) as *mut _, 16 * PAGE) };
    let err = dev.to_dev(map.addr, 64).map(|_| ()).unwrap_err();
    ensure_eq!(err.raw_os_error(), Some(libc::EINVAL), "migrating across a hole");
    let s = stats(ctx.variant())?;
    settled(ctx.variant(), s.get("allocated"))?;
    for p in (0..16).chain(32..64) {
        let got = &map.bytes()[p * PAGE..(p + 1) * PAGE];
        ensure!(got == &want[p * PAGE..(p + 1) * PAGE], "page {p} lost its data");
    }
    // The rest of the mapping is unmapped page by page (the hole is gone already).
    // SAFETY: Unmaps what is left of our mapping.
    unsafe {
        libc::munmap(map.addr as *mut _, 16 * PAGE);
        libc::munmap(map.page(32) as *mut _, 32 * PAGE);
    }
    map.forget();
    settled(ctx.variant(), 0).map(|_| ())
}

fn mprotect(map: &Map, prot: i32) -> R {
    // SAFETY: Changes the protection of our own mapping.
    if unsafe { libc::mprotect(map.addr as *mut _, map.len, prot) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn data_read_only(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(32 * PAGE)?;
    let seed = seed(ctx, "read_only");
    fill(map.bytes(), seed);
    mprotect(&map, libc::PROT_READ)?;
    to_dev_all(&dev, &map)?;
    settled(ctx.variant(), 32)?;
    // The device may read but not write a read-only mapping.
    verify(&dev.read(map.addr, 32)?, seed, "device read")?;
    let junk = vec![0x5au8; 32 * PAGE];
    let err = dev.write(map.addr, &junk).unwrap_err();
    ensure_eq!(err.raw_os_error(), Some(libc::EPERM), "device write to a read-only mapping");
    // SAFETY: Reads the mapping, which is readable.
    let cpu = unsafe { std::slice::from_raw_parts(map.addr as *const u8, map.len) };
    verify(cpu, seed, "CPU read after the refused write")?;
    if coherent(ctx) {
        dev.to_sys(map.addr, 32)?;
    }
    settled(ctx.variant(), 0)?;
    mprotect(&map, libc::PROT_READ | libc::PROT_WRITE)
}

fn data_prot_none(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(32 * PAGE)?;
    let seed = seed(ctx, "prot_none");
    fill(map.bytes(), seed);
    mprotect(&map, libc::PROT_NONE)?;
    let err = dev.to_dev(map.addr, 32).unwrap_err();
    ensure_eq!(err.raw_os_error(), Some(libc::EINVAL), "migrating a PROT_NONE range");
    let err = dev.read(map.addr, 32).unwrap_err();
    ensure!(
        matches!(err.raw_os_error(), Some(libc::EFAULT) | Some(libc::EINVAL) | Some(libc::EPERM)),
        "device read of a PROT_NONE range: {err}"
    );
    settled(ctx.variant(), 0)?;
    mprotect(&map, libc::PROT_READ | libc::PROT_WRITE)?;
    verify(map.bytes(), seed, "after PROT_NONE")
}

fn fork_cow_both_write(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(128 * PAGE)?;
    let seed = seed(ctx, "cow");
    fill(map.bytes(), seed);
    to_dev_all(&dev, &map)?;
    let half = 64 * PAGE;
    let (cseed, pseed) = (seed ^ 0xc, seed ^ 0xf);
    let bytes = map.bytes();
    // SAFETY: The child writes its own copy-on-write view and exits.
    let pid = unsafe { libc::fork() };
    let mut want = vec![0u8; map.len];
    fill(&mut want, seed);
    if pid == 0 {
        let ok = bytes[half..] == want[half..];
        fill(&mut bytes[..half], cseed);
        let ok = ok && verify(&bytes[..half], cseed, "child's writes").is_ok();
        // SAFETY: Ends the child.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    fill(&mut bytes[half..], pseed);
    let mut status = 0;
    // SAFETY: Waits for our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child saw wrong data (status {status:#x})"
    );
    ensure!(bytes[..half] == want[..half], "the child's writes reached the parent");
    verify(&bytes[half..], pseed, "parent's writes")?;
    let s = stats(ctx.variant())?;
    settled(ctx.variant(), s.get("allocated"))?;
    dev.to_sys(map.addr, 128)?;
    settled(ctx.variant(), 0)?;
    ensure!(bytes[..half] == want[..half], "after migrating back");
    Ok(())
}

/// After fork the pages on the device are shared copy-on-write; a device write through the
/// parent's mirror must break COW for the parent only.
fn fork_device_write(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(16 * PAGE)?;
    let seed = seed(ctx, "device_write");
    fill(map.bytes(), seed);
    to_dev_all(&dev, &map)?;
    let bytes = map.bytes();
    let mut new = vec![0u8; map.len];
    fill(&mut new, seed ^ 1);
    let (wrote, child_ok) =
        child_after(|| verify(bytes, seed, "child").is_ok(), || dev.write(map.addr, &new))?;
    wrote.map_err(|e| Fail::Fail(format!("device write to a COW-shared page: {e}")))?;
    ensure!(child_ok, "the child saw the parent's device write");
    ensure!(map.bytes()[..] == new[..], "the parent does not see its device write");
    let s = stats(ctx.variant())?;
    settled(ctx.variant(), s.get("allocated")).map(|_| ())
}

/// THPs a forked child maps too, migrated with single-page destinations: a system THP to the
/// device when the device THP fails, a device THP back when the system THP fails. The core
/// splits the source after it was unmapped everywhere; every mapping of it must be split then,
/// the child's too. Without series patch 8 only the migrating process's PMD was: the child's
/// PMD migration entry was restored onto a single page (`kernel BUG at mm/migrate.c`, in
/// `remove_migration_pte()`; found by the fuzzer).
fn fork_shared_thp_single_pages(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let (sys, on_dev) = (Map::thp(THP)?, Map::thp(THP)?);
    let seed = seed(ctx, "shared_thp");
    fill(sys.bytes(), seed);
    fill(on_dev.bytes(), seed ^ 1);
    if dev.snapshot(sys.addr, 1)?[0] & uapi::PROT_PMD == 0 {
        return Err(Fail::Skip(
            "no THP for the source buffer (transparent_hugepage not available)".into(),
        ));
    }
    to_dev_all(&dev, &on_dev)?;
    let s = settled(ctx.variant(), THP_PAGES as u64)?;
    ensure_eq!(s.get("large_folios"), 1, "device THPs before the fork");
    let (a, b) = (sys.bytes(), on_dev.bytes());
    let (migrated, child_ok) = child_after(
        || verify(a, seed, "child").is_ok() && verify(b, seed ^ 1, "child").is_ok(),
        || -> R<(u64, u64)> {
            dev.fail_next_alloc()?;
            let there = dev.to_dev(sys.addr, THP_PAGES).map_err(|e| {
                Fail::Fail(format!("MIGRATE_TO_DEV of the shared THP: {e}"))
            })?;
            dev.fail_next_alloc()?;
            let back = dev.to_sys(on_dev.addr, THP_PAGES).map_err(|e| {
                Fail::Fail(format!("MIGRATE_TO_SYS of the shared device THP: {e}"))
            })?;
            Ok((there, back))
        },
    )?;
    let (there, back) = migrated?;
    ensure_eq!(there, THP_PAGES as u64, "pages of the shared THP migrated to the device");
    ensure_eq!(back, THP_PAGES as u64, "pages of the shared device THP migrated back");
    ensure!(child_ok, "the child saw wrong data");
    let s = stats(ctx.variant())?;
    ensure_eq!(s.get("large_folios"), 0, "device THPs after the failed allocations");
    verify(on_dev.bytes(), seed ^ 1, "the device THP back page by page")?;
    verify(sys.bytes(), seed, "the THP on the device page by page")?;
    drop((sys, on_dev));
    settled(ctx.variant(), 0).map(|_| ())
}

/// A THP of a tmpfs file mapped shared, PMD-mapped: MIGRATE_TO_DEV must leave it where it is
/// (only anonymous memory moves to the device: `ENOENT`), whether the device THP is allocated or
/// fails, with its data intact and nothing allocated. The core collects a PMD-mapped THP of any
/// VMA whole; a file folio must not reach the split of an unmapped anonymous folio.
fn shmem_thp_stays(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let dir = "/tmp/dmirror-shmem-huge";
    let _ = std::fs::create_dir(dir);
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (src, dst, fs, opts) = (c("tmpfs"), c(dir), c("tmpfs"), c("huge=always,size=16M"));
    // SAFETY: All strings are NUL-terminated and live across the call.
    let r = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, opts.as_ptr().cast()) };
    ensure!(r == 0, "mount tmpfs -o huge=always: {}", std::io::Error::last_os_error());
    let result = (|| -> R {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .open(format!("{dir}/f"))?;
        file.set_len(THP as u64)?;
        let map = Map::thp(THP)?;
        use std::os::fd::AsRawFd;
        // SAFETY: Replaces our own aligned mapping with the file, at the same place.
        let p = unsafe {
            libc::mmap(
                map.addr as *mut _,
                THP,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            )
        };
        ensure!(p as usize == map.addr, "mmap of the tmpfs file");
        let seed = seed(ctx, "shmem");
        fill(map.bytes(), seed);
        if dev.snapshot(map.addr, 1)?[0] & uapi::PROT_PMD == 0 {
            return Err(Fail::Skip("the tmpfs file got no THP".into()));
        }
        for fail in [false, true] {
            if fail {
                dev.fail_next_alloc()?;
            }
            let r = dev.to_dev(map.addr, THP_PAGES);
            ensure!(
                r.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::ENOENT),
                "MIGRATE_TO_DEV of a shared tmpfs THP (failed allocation {fail}): {r:?}, not ENOENT"
            );
            settled(ctx.variant(), 0)?;
            verify(map.bytes(), seed, "the tmpfs THP after MIGRATE_TO_DEV")?;
        }
        Ok(())
    })();
    // SAFETY: Unmounts what this case mounted (lazily: the mapping may still be alive).
    unsafe { libc::umount2(dst.as_ptr(), libc::MNT_DETACH) };
    result
}

fn fork_child_migrates(ctx: &Ctx) -> R {
    let map = Map::anon(64 * PAGE)?;
    let seed = seed(ctx, "child_migrates");
    fill(map.bytes(), seed);
    let path = ctx.path();
    let addr = map.addr;
    let ok = in_child(|| {
        let dev = Dev::open(&path)?;
        let n = dev.to_dev(addr, 64)?;
        ensure_eq!(n, 64, "child's migration");
        Ok(())
    })?;
    ensure!(ok, "the child's migration failed");
    settled(ctx.variant(), 0)?;
    verify(map.bytes(), seed, "parent's data after the child migrated shared pages")
}

fn munmap_on_device(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let pages = Map::anon(64 * PAGE)?;
    let huge = Map::thp(THP)?;
    fill(pages.bytes(), 3);
    fill(huge.bytes(), 4);
    to_dev_all(&dev, &pages)?;
    to_dev_all(&dev, &huge)?;
    settled(ctx.variant(), (64 + THP_PAGES) as u64)?;
    drop(pages);
    settled(ctx.variant(), THP_PAGES as u64)?;
    drop(huge);
    settled(ctx.variant(), 0).map(|_| ())
}

/// THPs queued for deferred split because they are partly unmapped.
fn partially_mapped_thps() -> R<u64> {
    let path = "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/stats/nr_anon_partially_mapped";
    let text = std::fs::read_to_string(path)?;
    text.trim().parse().map_err(|e| Fail::Fail(format!("{path}: {text:?}: {e}")))
}

/// A device THP unmapped half, then whole. Partly unmapped, a device-coherent THP is queued for
/// deferred split (a device-private one is not); freed, it must leave the queue (series patch
/// 1: stock 7.3 leaves it there, counted in `nr_anon_partially_mapped`).
fn munmap_half_thp(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::thp(THP)?;
    let seed = seed(ctx, "half_thp");
    fill(map.bytes(), seed);
    to_dev_all(&dev, &map)?;
    settled(ctx.variant(), THP_PAGES as u64)?;
    let before = partially_mapped_thps()?;
    // SAFETY: Unmaps the second half of our own mapping.
    unsafe { libc::munmap(map.page(THP_PAGES / 2) as *mut _, THP / 2) };
    let queued = partially_mapped_thps()?;
    diag!("nr_anon_partially_mapped: {before} before, {queued} with half the device THP unmapped");
    ensure_eq!(
        queued.wrapping_sub(before),
        u64::from(ctx.variant() == Variant::Coherent),
        "THPs newly queued for deferred split"
    );
    let s = stats(ctx.variant())?;
    settled(ctx.variant(), s.get("allocated"))?;
    let mut want = vec![0u8; THP];
    fill(&mut want, seed);
    // SAFETY: The first half is still mapped.
    let first = unsafe { std::slice::from_raw_parts(map.addr as *const u8, THP / 2) };
    ensure!(first == &want[..THP / 2], "the mapped half lost its data");
    // SAFETY: Unmaps the first half.
    unsafe { libc::munmap(map.addr as *mut _, THP / 2) };
    map.forget();
    settled(ctx.variant(), 0)?;
    ensure_eq!(partially_mapped_thps()?, before, "THPs queued for deferred split once the device THP was freed");
    Ok(())
}

fn mremap_to(map: &Map, flags: i32) -> R<usize> {
    let dst = Map::anon(map.len)?;
    let to = dst.addr;
    dst.forget();
    // SAFETY: Moves our own mapping over the placeholder `dst`.
    let p = unsafe {
        libc::mremap(
            map.addr as *mut _,
            map.len,
            map.len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | flags,
            to as *mut libc::c_void,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(p as usize)
}

fn mremap_move(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(64 * PAGE)?;
    let seed = seed(ctx, "mremap");
    fill(map.bytes(), seed);
    to_dev_all(&dev, &map)?;
    let to = mremap_to(&map, 0)?;
    let len = map.len;
    map.forget();
    let moved = Map { addr: to, len };
    settled(ctx.variant(), 64)?;
    on_device(ctx, &dev, &moved, |_| true)?;
    verify(moved.bytes(), seed, "data at the new address")?;
    if coherent(ctx) {
        dev.to_sys(moved.addr, 64)?;
    }
    settled(ctx.variant(), 0).map(|_| ())
}

fn mremap_dontunmap(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(64 * PAGE)?;
    let seed = seed(ctx, "dontunmap");
    fill(map.bytes(), seed);
    to_dev_all(&dev, &map)?;
    let to = mremap_to(&map, libc::MREMAP_DONTUNMAP)?;
    let moved = Map { addr: to, len: map.len };
    // The pages moved; the old range stays mapped, empty.
    settled(ctx.variant(), 64)?;
    on_device(ctx, &dev, &moved, |_| true)?;
    verify_zero(map.bytes(), "old range after MREMAP_DONTUNMAP")?;
    verify(moved.bytes(), seed, "data at the new address")?;
    if coherent(ctx) {
        dev.to_sys(moved.addr, 64)?;
    }
    settled(ctx.variant(), 0).map(|_| ())
}

fn madvise(map: &Map, advice: i32) -> R {
    // SAFETY: Advises on our own mapping.
    if unsafe { libc::madvise(map.addr as *mut _, map.len, advice) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn madvise_dontneed(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(64 * PAGE)?;
    fill(map.bytes(), 5);
    to_dev_all(&dev, &map)?;
    madvise(&map, libc::MADV_DONTNEED)?;
    settled(ctx.variant(), 0)?;
    verify_zero(map.bytes(), "after MADV_DONTNEED")
}

/// `MADV_DONTNEED` on another thread races with MIGRATE_TO_DEV: a page unmapped after the
/// migration put its device page in place, but before the driver mirrored it, must not stay
/// mirrored. A coherent page's mirror entry holds a reference, so such an entry would keep the
/// page in use, unmapped, where no eviction can move it (and RELEASE would wait for it), until
/// the next invalidation of its address. Each round unmaps one of the first pages once, at a
/// random moment of the migration of all of them, and checks before any further invalidation that every
/// device page in use is mapped.
fn to_dev_races_dontneed(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(256 * PAGE)?;
    let mut rng = Rng::new(seed(ctx, "races-dontneed"));
    let started = std::time::Instant::now();
    let mut rounds = 0u32;
    while rounds < 400 && started.elapsed() < Duration::from_secs(40) {
        rounds += 1;
        // Every page back in system memory, so that the migration has all of them to move.
        madvise(&map, libc::MADV_DONTNEED)?;
        map.bytes().fill(rounds as u8);
        let (delay, page) = (rng.below(1500), rng.below(8) as usize);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_micros(delay));
                // SAFETY: Advises on one page of our own mapping, which outlives the thread.
                unsafe { libc::madvise((map.addr + page * PAGE) as *mut _, PAGE, libc::MADV_DONTNEED) };
            });
            // A page unmapped mid-window is a hole, and holes migrate too; the ioctl's result
            // is the race's business, only the state after it is checked.
            let _ = dev.to_dev(map.addr, map.npages());
        });
        let s = stats(ctx.variant())?;
        ensure_eq!(
            s.get("allocated"),
            s.get("mapped"),
            "device pages in use vs mapped after round {rounds} (page {page} unmapped after {delay} us)"
        );
    }
    diag!("{rounds} rounds");
    madvise(&map, libc::MADV_DONTNEED)?;
    settled(ctx.variant(), 0)?;
    // And the device still works.
    let seed = seed(ctx, "races-dontneed");
    fill(map.bytes(), seed);
    to_dev_all(&dev, &map)?;
    verify(map.bytes(), seed, "migrated after the race")
}

/// `MADV_DONTNEED` on another thread races with EXCLUSIVE: a page unmapped after exclusive
/// access was taken, but before the driver mirrored it, must not stay mirrored (the device would
/// read, and atomically update, a page the process no longer has). Each round takes exclusive
/// access to a page while the other thread unmaps it at a random moment, then reads it through
/// the device before the CPU touches it: the device must see what the CPU then sees.
fn exclusive_races_dontneed(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(PAGE)?;
    let buf = Map::anon(PAGE)?;
    let mut rng = Rng::new(seed(ctx, "exclusive-races"));
    let started = std::time::Instant::now();
    let mut rounds = 0u32;
    while rounds < 5000 && started.elapsed() < Duration::from_secs(20) {
        rounds += 1;
        let byte = (rounds % 255 + 1) as u8;
        // Writing ends the exclusive access of the round before.
        map.bytes().fill(byte);
        let delay = Duration::from_nanos(rng.below(40_000));
        std::thread::scope(|s| {
            s.spawn(|| {
                // Spun, not slept: a sleep this short lasts the timer slack.
                let t = std::time::Instant::now();
                while t.elapsed() < delay {
                    std::hint::spin_loop();
                }
                // SAFETY: Advises on our own mapping, which outlives the thread.
                unsafe { libc::madvise(map.addr as *mut _, PAGE, libc::MADV_DONTNEED) };
            });
            // The ioctl's result is the race's business; only the state after it is checked.
            let _ = dev.cmd(uapi::EXCLUSIVE, map.addr, buf.addr, 1);
        });
        let seen = dev.read(map.addr, 1)?;
        let cpu = map.bytes()[0];
        ensure!(
            seen.iter().all(|&b| b == cpu),
            "round {rounds}: the device reads {:#x}, the CPU {cpu:#x} (unmapped after {delay:?})",
            seen[0]
        );
    }
    diag!("{rounds} rounds");
    Ok(())
}

fn madvise_free(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(64 * PAGE)?;
    let seed = seed(ctx, "madv_free");
    fill(map.bytes(), seed);
    to_dev_all(&dev, &map)?;
    madvise(&map, libc::MADV_FREE)?;
    let s = stats(ctx.variant())?;
    settled(ctx.variant(), s.get("allocated"))?;
    // Each page is either intact or reclaimed to zero, never anything else.
    let mut want = vec![0u8; map.len];
    fill(&mut want, seed);
    for p in 0..64 {
        let got = &map.bytes()[p * PAGE..(p + 1) * PAGE];
        let w = &want[p * PAGE..(p + 1) * PAGE];
        ensure!(got == w || got.iter().all(|&b| b == 0), "page {p} is neither data nor zero");
    }
    if coherent(ctx) {
        dev.to_sys(map.addr, 64)?;
    }
    drop(map);
    settled(ctx.variant(), 0).map(|_| ())
}

/// Threads migrate the same and neighbouring ranges to the device while others fault them
/// back by writing and checking their own words of every page, and another forks children
/// that read the range; for a bounded time. No word may ever be lost.
fn concurrent(ctx: &Ctx) -> R {
    const PAGES: usize = 256;
    const WRITERS: usize = 2;
    let map = Arc::new(Map::anon(PAGES * PAGE)?);
    map.bytes().fill(0);
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let migrations = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    // Migrators: two on the whole range, one on each half.
    for (first, n) in [(0, PAGES), (0, PAGES), (0, PAGES / 2), (PAGES / 2, PAGES / 2)] {
        let (map, stop, migrations, path) = (map.clone(), stop.clone(), migrations.clone(), ctx.path());
        threads.push(std::thread::spawn(move || -> Result<(), String> {
            let dev = Dev::open(&path).map_err(|e| format!("{e:?}"))?;
            while !stop.load(Ordering::Relaxed) {
                match dev.to_dev(map.page(first), n) {
                    // Racing with faults: some pages may be back already (ENOENT on readback)
                    // or busy; device memory is plenty.
                    Ok(_) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EBUSY)) => {}
                    Err(e) => return Err(format!("MIGRATE_TO_DEV: {e}")),
                }
                migrations.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    // Writers: each owns one u64 per page and checks it before writing the next value.
    for w in 0..WRITERS {
        let (map, stop, errors) = (map.clone(), stop.clone(), errors.clone());
        threads.push(std::thread::spawn(move || -> Result<(), String> {
            let mut last = vec![0u64; PAGES];
            let mut r = Rng::new(w as u64 + 7);
            let mut value = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = r.below(PAGES as u64) as usize;
                let word = (map.page(p) + w * 8) as *mut u64;
                // Volatile: a real memory access each time, which faults the page back.
                // SAFETY: The word is inside the mapping and only this thread writes it.
                let old = unsafe { std::ptr::read_volatile(word) };
                if old != last[p] {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                value += 1;
                // SAFETY: As above.
                unsafe { std::ptr::write_volatile(word, value) };
                last[p] = value;
            }
            // Every word must hold the last value written to it.
            for (p, &v) in last.iter().enumerate() {
                // SAFETY: As above.
                if unsafe { std::ptr::read_volatile((map.page(p) + w * 8) as *const u64) } != v {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        }));
    }
    // A forker: children read the range and exit.
    {
        let (map, stop) = (map.clone(), stop.clone());
        threads.push(std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: The child only reads memory and exits.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    let sum: u64 = map.bytes().iter().step_by(PAGE).map(|&b| u64::from(b)).sum();
                    std::hint::black_box(sum);
                    // SAFETY: Ends the child.
                    unsafe { libc::_exit(0) };
                }
                let mut status = 0;
                // SAFETY: Waits for our child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                    return Err(format!("a forked reader died: {status:#x}"));
                }
            }
            Ok(())
        }));
    }
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join()
            .map_err(|_| Fail::Fail("a thread panicked".into()))?
            .map_err(Fail::Fail)?;
    }
    diag!("{} migrations", migrations.load(Ordering::Relaxed));
    ensure_eq!(errors.load(Ordering::Relaxed), 0, "words lost or reordered");
    ensure!(migrations.load(Ordering::Relaxed) > 0, "no migration ran");
    let s = stats(ctx.variant())?;
    settled(ctx.variant(), s.get("allocated"))?;
    drop(map);
    settled(ctx.variant(), 0).map(|_| ())
}

/// A CPU read of one device page brings back the naturally aligned window of `fault_around`
/// pages around it (clipped to the mapping), and no page outside it: with the default window,
/// then reloaded with `fault_around=4` and `fault_around=16`. The CPU reaches coherent device
/// memory without faults: there, the read moves nothing.
fn cpu_fault_window(ctx: &Ctx) -> R {
    const PAGES: usize = 96;
    let check = |window: usize| -> R {
        let dev = Dev::open(&ctx.path())?;
        let map = Map::anon(PAGES * PAGE)?;
        let seed = seed(ctx, "fault-window") ^ window as u64;
        fill(map.bytes(), seed);
        to_dev_all(&dev, &map)?;
        let touched = 37;
        // SAFETY: The address is inside the mapping, which lives until the end of the scope.
        let _ = unsafe { std::ptr::read_volatile(map.page(touched) as *const u8) };
        let size = window * PAGE;
        let back: Vec<usize> = (0..PAGES)
            .filter(|&i| map.page(i) & !(size - 1) == map.page(touched) & !(size - 1))
            .collect();
        let snap = dev.snapshot(map.addr, PAGES)?;
        let on_device = |i: usize| snap[i] & uapi::PROT_DEV_MASK == local_prot(coherent(ctx));
        for (i, _) in snap.iter().enumerate() {
            let want = coherent(ctx) || !back.contains(&i);
            ensure!(
                on_device(i) == want,
                "window {window}: page {i} {} the device after a read of page {touched} \
                 (snapshot {:#x}); expected back: pages {:?}",
                if want { "left" } else { "is still on" },
                snap[i],
                back
            );
        }
        let resident = if coherent(ctx) { PAGES } else { PAGES - back.len() };
        settled(ctx.variant(), resident as u64)?;
        verify(map.bytes(), seed, "pages after the fault")?;
        drop(dev);
        drop(map);
        settled(ctx.variant(), 0).map(|_| ())
    };
    let default = stats(ctx.variant())?.get("fault_around") as usize;
    ensure!(default.is_power_of_two(), "fault_around {default} of a loaded device");
    check(default)?;
    if coherent(ctx) {
        return Ok(());
    }
    let result = [4, 16].into_iter().try_for_each(|window| {
        inspect::unload()?;
        let mut args = ctx.config.args.clone();
        args.push(format!("fault_around={window}"));
        inspect::load(&ctx.config.module, &args)?;
        ensure_eq!(stats(ctx.variant())?.get("fault_around"), window as u64, "fault_around after the reload");
        check(window)
    });
    inspect::unload()?;
    inspect::load(&ctx.config.module, &ctx.config.args)?;
    result
}

/// The device's capacity in pages with the suite's module arguments; for the private device
/// the module is reloaded with `max_chunks=1`.
fn capacity_enomem(ctx: &Ctx) -> R {
    let reload = !coherent(ctx);
    if reload {
        inspect::unload()?;
        let mut args = ctx.config.args.clone();
        args.push("max_chunks=1".into());
        inspect::load(&ctx.config.module, &args)?;
    }
    let result = (|| {
        let dev = Dev::open(&ctx.path())?;
        let cap = {
            let s = stats(ctx.variant())?;
            s.get("max_chunks") * s.get("chunk_pages")
        };
        let map = Map::thp(cap as usize * PAGE + THP)?;
        fill(map.bytes(), 6);
        let err = dev.to_dev(map.addr, map.npages()).unwrap_err();
        ensure_eq!(err.raw_os_error(), Some(libc::ENOMEM), "migrating past the capacity");
        let s = settled(ctx.variant(), cap)?;
        ensure_eq!(s.get("free"), 0, "free pages of a full device");
        // Exactly the capacity went, and the failed migration lost nothing.
        let snap = dev.snapshot(map.addr, map.npages())?;
        let want = local_prot(coherent(ctx));
        let on = snap.iter().filter(|&&s| s & uapi::PROT_DEV_MASK == want).count();
        ensure_eq!(on as u64, cap, "pages in device memory after ENOMEM");
        verify(map.bytes(), 6, "the range after ENOMEM")?;
        drop(map);
        settled(ctx.variant(), 0)?;
        // After the pressure, the device works again.
        let small = Map::anon(16 * PAGE)?;
        fill(small.bytes(), 7);
        to_dev_all(&dev, &small)?;
        verify(small.bytes(), 7, "after the device was full")
    })();
    if reload {
        inspect::unload()?;
        inspect::load(&ctx.config.module, &ctx.config.args)?;
    }
    result
}

fn fail_alloc_every_path(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    // MIGRATE_TO_DEV, one page: that page stays in system memory, the rest go.
    let pages = Map::anon(8 * PAGE)?;
    fill(pages.bytes(), 8);
    dev.fail_next_alloc()?;
    let r = dev.to_dev(pages.addr, 8);
    ensure!(
        r.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::ENOENT),
        "MIGRATE_TO_DEV with a failed allocation: {r:?}"
    );
    let snap = dev.snapshot(pages.addr, 8)?;
    let on = snap.iter().filter(|&&s| s & uapi::PROT_DEV_MASK == local_prot(coherent(ctx))).count();
    ensure_eq!(on, 7, "pages on the device after one failed allocation");
    settled(ctx.variant(), 7)?;
    verify(pages.bytes(), 8, "pages after the failed allocation")?;
    if coherent(ctx) {
        dev.to_sys(pages.addr, 8)?;
    }
    settled(ctx.variant(), 0)?;
    // MIGRATE_TO_DEV, a THP: the device THP fails, it goes page by page.
    let huge = Map::thp(THP)?;
    fill(huge.bytes(), 9);
    dev.fail_next_alloc()?;
    to_dev_all(&dev, &huge)?;
    let s = settled(ctx.variant(), THP_PAGES as u64)?;
    ensure_eq!(s.get("large_folios"), 0, "device THPs after a failed THP allocation");
    verify(&dev.read(huge.addr, THP_PAGES)?, 9, "device read")?;
    dev.to_sys(huge.addr, THP_PAGES)?;
    settled(ctx.variant(), 0)?;
    verify(huge.bytes(), 9, "back from the device")?;
    // MIGRATE_TO_SYS of a device THP with a failed system THP: it comes back page by page,
    // the core splitting the device folio (coherent ones too, with the series' split fix).
    let huge2 = Map::thp(THP)?;
    fill(huge2.bytes(), 10);
    to_dev_all(&dev, &huge2)?;
    dev.fail_next_alloc()?;
    let back = dev.to_sys(huge2.addr, THP_PAGES)?;
    ensure_eq!(back, THP_PAGES as u64, "pages back after a failed system THP");
    settled(ctx.variant(), 0)?;
    verify(huge2.bytes(), 10, "device THP back after a failed allocation")?;
    drop(huge2);
    settled(ctx.variant(), 0).map(|_| ())
}

/// Returns the pages of `map` (all of them written, so all mapped) that SNAPSHOT finds neither
/// in system memory nor in this device's: a migration entry that outlived its migration (no
/// migration runs while this is called).
fn stale_entries(dev: &Dev, map: &Map) -> R<Vec<usize>> {
    Ok(dev
        .snapshot(map.addr, map.npages())?
        .iter()
        .enumerate()
        .filter(|(_, &s)| s & 0x03 == 0)
        .map(|(i, _)| i)
        .collect())
}

/// A failed allocation in the middle of a MIGRATE_TO_SYS window, after the window's first
/// pages got their destinations: the driver gives up the window. Every source must be left
/// mapped where it was; a migration that is finalised without having moved anything left
/// migration entries behind whose page was unlocked, and every later access to them (the
/// CPU's, `hmm_range_fault()`'s) waited for ever (found by the fuzzer). Another thread sets
/// the one-shot failure flag while this one migrates, so the failure lands anywhere in a window.
fn fail_alloc_mid_window(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(64 * PAGE)?;
    let seed = seed(ctx, "mid-window");
    fill(map.bytes(), seed);
    let stop = AtomicBool::new(false);
    let started = std::time::Instant::now();
    let (mut rounds, mut failed) = (0u32, 0u32);
    let result = std::thread::scope(|s| -> R {
        let flagger = s.spawn(|| {
            let mut rng = Rng::new(seed);
            while !stop.load(Ordering::Relaxed) {
                let _ = dev.fail_next_alloc();
                // A window takes a few hundred microseconds.
                std::thread::sleep(Duration::from_micros(rng.below(600)));
            }
        });
        let mut run = || -> R {
            while rounds < 400 && started.elapsed() < Duration::from_secs(60) {
                rounds += 1;
                // To the device (a failed allocation leaves a page behind; fine).
                let _ = dev.to_dev(map.addr, 64);
                match dev.to_sys(map.addr, 64) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => failed += 1,
                    Err(e) => return Err(Fail::Fail(format!("MIGRATE_TO_SYS: {e}"))),
                }
                let stale = stale_entries(&dev, &map)?;
                ensure!(
                    stale.is_empty(),
                    "round {rounds}: migration entries left behind at pages {stale:?} after a \
                     MIGRATE_TO_SYS that failed {failed} time(s)"
                );
            }
            Ok(())
        };
        let r = run();
        stop.store(true, Ordering::Relaxed);
        let _ = flagger.join();
        r
    });
    diag!("{rounds} rounds, {failed} MIGRATE_TO_SYS failed with ENOMEM");
    result?;
    ensure!(failed > 0, "no MIGRATE_TO_SYS failed: the flag never landed");
    // A flag still set fails one more window at most; then everything comes back, intact.
    if dev.to_sys(map.addr, 64).is_err() {
        dev.to_sys(map.addr, 64)?;
    }
    settled(ctx.variant(), 0)?;
    verify(map.bytes(), seed, "after the failed windows")
}

fn kill_mid_migration(ctx: &Ctx) -> R {
    // Held open here, so the counters outlive each child.
    let _dev = Dev::open(&ctx.path())?;
    let mut r = Rng::new(seed(ctx, "kill"));
    for round in 0..6 {
        let path = ctx.path();
        // SAFETY: The child loops migrating until it is killed.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let run = || -> R {
                let dev = Dev::open(&path)?;
                let map = Map::thp(4 * THP)?;
                fill(map.bytes(), 11);
                loop {
                    let _ = dev.to_dev(map.addr, map.npages());
                    let _ = dev.to_sys(map.addr, map.npages() / 2);
                    std::hint::black_box(map.bytes()[map.len - 1]);
                }
            };
            let _ = run();
            // SAFETY: Ends the child.
            unsafe { libc::_exit(1) };
        }
        std::thread::sleep(Duration::from_millis(200 + r.below(800)));
        // SAFETY: Kills and reaps our child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        settled(ctx.variant(), 0).map_err(|e| match e {
            Fail::Fail(m) => Fail::Fail(format!("round {round}: {m}")),
            s => s,
        })?;
    }
    Ok(())
}

/// Migrates a pattern of pages and a THP to the device, the THP as one device THP mapped by a
/// PMD; returns the maps.
fn some_on_device(ctx: &Ctx, dev: &Dev) -> R<(Map, Map)> {
    let pages = Map::anon(64 * PAGE)?;
    let huge = Map::thp(THP)?;
    fill(pages.bytes(), seed(ctx, "evict_pages"));
    fill(huge.bytes(), seed(ctx, "evict_thp"));
    to_dev_all(dev, &pages)?;
    to_dev_all(dev, &huge)?;
    let s = settled(ctx.variant(), (64 + THP_PAGES) as u64)?;
    ensure_eq!(s.get("large_folios"), 1, "device THPs");
    on_device(ctx, dev, &pages, |_| true)?;
    let snap = dev.snapshot(huge.addr, THP_PAGES)?;
    let want = local_prot(coherent(ctx)) | uapi::PROT_PMD;
    for (i, &s) in snap.iter().enumerate() {
        ensure_eq!(s & (uapi::PROT_DEV_MASK | uapi::PROT_PMD), want, "THP page {i}: snapshot {s:#x}");
    }
    Ok((pages, huge))
}

fn back_intact(ctx: &Ctx, pages: &Map, huge: &Map) -> R {
    let check = Dev::open(&ctx.path())?;
    on_device(ctx, &check, pages, |_| false)?;
    on_device(ctx, &check, huge, |_| false)?;
    verify(pages.bytes(), seed(ctx, "evict_pages"), "pages after eviction")?;
    verify(huge.bytes(), seed(ctx, "evict_thp"), "THP after eviction")
}

fn last_close_with_pages(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let (pages, huge) = some_on_device(ctx, &dev)?;
    let before = stats(ctx.variant())?.get("evictions");
    drop(dev);
    let s = settled(ctx.variant(), 0)?;
    ensure_eq!(s.get("chunks"), 0, "chunks after the last close");
    ensure_eq!(s.get("evictions"), before + 1, "evictions");
    back_intact(ctx, &pages, &huge)
}

fn release_with_pages(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let (pages, huge) = some_on_device(ctx, &dev)?;
    // The ABI checks the range of every command, RELEASE's too, though it evicts everything.
    let err = dev.cmd(uapi::RELEASE, 0, 0, 0).unwrap_err();
    ensure_eq!(err.raw_os_error(), Some(libc::EINVAL), "RELEASE with no range");
    dev.release(pages.addr, 1)?;
    let s = settled(ctx.variant(), 0)?;
    ensure_eq!(s.get("chunks"), 0, "chunks after RELEASE");
    back_intact(ctx, &pages, &huge)?;
    // The device works after RELEASE.
    to_dev_all(&dev, &pages)?;
    verify(pages.bytes(), seed(ctx, "evict_pages"), "migrated again after RELEASE")
}

/// A device page that a pipe holds (`vmsplice()` takes a reference to the page it maps, which
/// the pipe keeps until it is read) cannot be evicted. RELEASE waits a little for it, then says
/// `EBUSY`, the memory still registered and the data where it was (a signal ends the wait at
/// once); the last close the same, without hanging the closing task; and the module refuses to
/// unload rather than wait in its exit. Once the pipe is read, RELEASE evicts everything. A
/// device-private page is not mapped as such: `vmsplice()` brings it back to system memory
/// first, so RELEASE does not wait for it.
fn release_with_spliced_page(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(16 * PAGE)?;
    let seed = seed(ctx, "spliced");
    fill(map.bytes(), seed);
    to_dev_all(&dev, &map)?;
    let pipe = Pipe::new()?;
    ensure_eq!(pipe.vmsplice(map.addr, PAGE)?, PAGE, "bytes vmsplice()d");
    let held = coherent(ctx);
    let started = std::time::Instant::now();
    let r = dev.release(map.addr, 1);
    if held {
        ensure_eq!(
            r.as_ref().map_err(|e| e.raw_os_error()),
            Err(Some(libc::EBUSY)),
            "RELEASE with a page in a pipe"
        );
        ensure!(started.elapsed() < Duration::from_secs(10), "RELEASE waited {:?}", started.elapsed());
        ensure!(stats(ctx.variant())?.get("chunks") > 0, "chunks after a refused RELEASE");
        // A signal ends the wait early: without SA_RESTART, the ioctl says EINTR.
        let (r, took) = release_interrupted(&dev, map.addr)?;
        ensure_eq!(
            r.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EINTR)),
            "RELEASE interrupted by a signal"
        );
        ensure!(took < Duration::from_millis(1500), "interrupted RELEASE took {took:?}");
        ensure!(stats(ctx.variant())?.get("chunks") > 0, "chunks after an interrupted RELEASE");
        // The last close cannot evict it either, and does not wait for it for ever.
        drop(dev);
        ensure!(stats(ctx.variant())?.get("chunks") > 0, "chunks after the last close");
        // Nor can unloading: the module keeps itself loaded, and rmmod says so at once.
        let started = std::time::Instant::now();
        ensure!(inspect::unload().is_err(), "rmmod with device memory in a pipe succeeded");
        ensure!(inspect::loaded(), "the module is gone");
        ensure!(started.elapsed() < Duration::from_secs(5), "rmmod took {:?}", started.elapsed());
    } else {
        r?;
        drop(dev);
    }
    verify(map.bytes(), seed, "pages after the refused eviction")?;
    ensure!(pipe.read(PAGE)? == map.bytes()[..PAGE], "the pipe's copy of page 0 differs");
    drop(pipe);
    let dev = Dev::open(&ctx.path())?;
    dev.release(map.addr, 1)?;
    let s = settled(ctx.variant(), 0)?;
    ensure_eq!(s.get("chunks"), 0, "chunks after RELEASE");
    verify(map.bytes(), seed, "pages after RELEASE")?;
    // Evicted: the module may go.
    drop(dev);
    inspect::unload()?;
    inspect::load(&ctx.config.module, &ctx.config.args)
}

/// RELEASE on another thread, sent a signal (a handler without `SA_RESTART`) 300 ms in: its
/// result, and how long it took.
fn release_interrupted(dev: &Dev, addr: usize) -> R<(std::io::Result<()>, Duration)> {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: All zeroes is a valid `sigaction`: no flags, an empty mask.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = nothing as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: As above.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: Both structures are valid; the handler is async-signal-safe (it does nothing).
    ensure_eq!(unsafe { libc::sigaction(libc::SIGUSR1, &act, &mut old) }, 0, "sigaction");
    let (tx, rx) = std::sync::mpsc::channel();
    let joined = std::thread::scope(|s| {
        let t = s.spawn(move || {
            // SAFETY: No preconditions.
            let _ = tx.send(unsafe { libc::pthread_self() });
            let started = std::time::Instant::now();
            let r = dev.release(addr, 1);
            (r, started.elapsed())
        });
        if let Ok(thread) = rx.recv() {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: The thread is joinable until joined below, so its id is valid.
            unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
        }
        t.join()
    });
    // SAFETY: Puts back the action saved above.
    unsafe { libc::sigaction(libc::SIGUSR1, &old, std::ptr::null_mut()) };
    joined.map_err(|_| Fail::Fail("the RELEASE thread panicked".into()))
}

fn rmmod_with_pages(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let (pages, huge) = some_on_device(ctx, &dev)?;
    drop(dev);
    inspect::unload()?;
    let result = (|| {
        verify(pages.bytes(), seed(ctx, "evict_pages"), "pages after rmmod")?;
        verify(huge.bytes(), seed(ctx, "evict_thp"), "THP after rmmod")
    })();
    inspect::load(&ctx.config.module, &ctx.config.args)?;
    result?;
    settled(ctx.variant(), 0).map(|_| ())
}

/// The last reference to a device-coherent page drops in interrupt context, and the driver's
/// `folio_free` (its allocator and backing-table locks) copes. An `O_DIRECT` write of more than
/// 256 pages to `/dev/nullb0` pins its source pages and releases them in the bio's completion,
/// which null_blk (`irqmode=2`, 200 ms, on the guest's command line) runs from a timer
/// interrupt; the buffer is unmapped while the write is in flight, so the release drops the
/// last reference. Lockdep (the debug kernel) reports a lock that `folio_free` takes with
/// interrupts enabled elsewhere; the run's dmesg scan fails the case then.
fn coherent_last_ref_in_irq(ctx: &Ctx) -> R {
    let v = Variant::Coherent;
    let path = format!("/dev/{}", v.device());
    if !std::path::Path::new(&path).exists() {
        return Err(Fail::Skip(format!("{path} missing: no coherent range given")));
    }
    const NULLB: &str = "/dev/nullb0";
    let nullb = match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(NULLB)
    {
        Ok(f) => f,
        Err(e) => return Err(Fail::Skip(format!("{NULLB}: {e} (CONFIG_BLK_DEV_NULL_BLK)"))),
    };
    let dev = Dev::open(&path)?;
    // Past 256 pages the block layer's direct I/O releases pages in the bio's completion.
    const PAGES: usize = 300;
    let map = Map::anon(PAGES * PAGE)?;
    fill(map.bytes(), seed(ctx, "irq"));
    ensure_eq!(dev.to_dev(map.addr, 1)?, 1, "pages migrated to the coherent device");
    settled(v, 1)?;
    let (addr, len) = (map.addr, map.len);
    let writer = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // No Rust reference to the buffer: it is unmapped while the kernel reads it.
        // SAFETY: A raw user pointer passed to the kernel, which validates and pins it.
        let n = unsafe { libc::pwrite(nullb.as_raw_fd(), addr as *const _, len, 0) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    });
    std::thread::sleep(Duration::from_millis(50));
    let still_writing = !writer.is_finished();
    map.forget();
    // SAFETY: Unmaps our own mapping; the in-flight write holds its pages pinned.
    unsafe { libc::munmap(addr as *mut _, len) };
    let written = writer
        .join()
        .map_err(|_| Fail::Fail("the writer thread panicked".into()))?
        .map_err(|e| Fail::Fail(format!("O_DIRECT write to {NULLB}: {e}")))?;
    ensure_eq!(written, len, "bytes written to {NULLB}");
    ensure!(still_writing, "the write finished before the buffer was unmapped (null_blk irqmode?)");
    // The completion releases the pages after it wakes the writer: wait for the free.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stats(v)?.get("allocated") != 0 {
        ensure!(std::time::Instant::now() < deadline, "the coherent page was never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    settled(v, 0).map(|_| ())
}
