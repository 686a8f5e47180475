// SPDX-License-Identifier: GPL-2.0

//! A simulated device and its memory.
//!
//! Device memory is a list of chunks, each a [`DevPagemap`] registered on demand. A
//! device-private device has chunks of [`CHUNK_SIZE`] bytes of free physical address space, up
//! to the `max_chunks` module parameter. A device-private page has no storage of its own: its
//! contents live in a system folio, its *backing*, kept in the chunk's table at the page's
//! index while the page is allocated. A device-coherent device carves its chunks, in order, out
//! of a firmware-reserved range of real memory; its pages hold their data themselves.
//!
//! The backing tables belong to the device, one per chunk slot, for its whole life: a chunk in
//! slot `n` (the `n`-th chunk added since the last eviction) uses table `n`. Each allocation
//! of a device-private folio gets a new generation of its table, so that a mirror entry can
//! name a device page by slot, index and generation ([`DevicePage`]), without holding a
//! reference, and still tell when the page was freed or allocated again.
//!
//! `Device::memory` and the backing tables' locks are the first and last of the driver's lock
//! order, which the crate root states. [`TableLock`] keeps one table's lock across a run of
//! lookups, for the mirror's walks and for [`to_system`].

use core::{
    fmt,
    sync::atomic::{AtomicUsize, Ordering},
};
use kernel::{
    alloc::flags::{__GFP_NOWARN, GFP_HIGHUSER, GFP_HIGHUSER_MOVABLE, GFP_KERNEL},
    mm::{
        folio::{Folio, LockedFolio, OwnedFolio},
        memremap::{
            Census, DevPagemap, DeviceFault, DeviceFolio, DevicePagemapOps, FreedFolio,
            PagemapOwner, ReservedRam, SplitFolio, VmFaultCode, PMD_ORDER, SECTION_SIZE,
        },
        migrate::{MigrateVma, Select, SelectFlag},
    },
    module::ModuleRef,
    new_condvar, new_mutex, new_spinlock_irq,
    page::PAGE_SIZE,
    prelude::*,
    sync::{Arc, CondVar, Mutex, MutexGuard, SpinLockIrq, SpinLockIrqGuard},
    time::{Delta, Instant, Monotonic},
};

/// How long an eviction that can give up (RELEASE, the last close) waits for device pages
/// that others hold.
const EVICT_TIMEOUT: Delta = Delta::from_secs(2);

/// The size of a chunk of device memory.
pub(crate) const CHUNK_SIZE: usize = 2 * SECTION_SIZE;

/// Where the data of a device page lives: page `page` of a system folio. A device folio of
/// order 9 is backed by one system folio of order 9, so its pages share it. A device folio that
/// goes back to system memory whole takes its backing there, as the destination (see
/// [`to_system`]).
#[derive(Clone)]
struct Backing {
    folio: OwnedFolio,
    page: usize,
    /// The generation of the allocation the page belongs to.
    gen: u64,
}

/// The backing of every allocated device page of a chunk slot, by page index.
///
/// Generations count allocations modulo 2^`GEN_BITS` (2^40 or more), so that a mirror entry
/// names a page in one word. A stale entry (see the mirror's `invalidate`) would read as live
/// again only if its page index were allocated again exactly a multiple of 2^40 allocations of
/// its table later while it stays in the mirror, 12 days of a million allocations a second; it
/// would then read that allocation's data. No memory is reached that is not a live backing.
struct Table {
    pages: KVVec<Option<Backing>>,
    /// The generation of the last allocation recorded.
    gen: u64,
}

impl Table {
    /// Returns the folio holding the data of `page` and the page's byte offset in it, if the
    /// page is still allocated by the allocation that `page` names.
    fn get(&self, page: &DevicePage) -> Option<(&OwnedFolio, usize)> {
        self.pages
            .get(page.index)?
            .as_ref()
            .filter(|b| b.gen == page.gen)
            .map(|b| (&b.folio, b.page * PAGE_SIZE))
    }

    /// See [`Chunk::hand_over`]; does not sleep.
    fn hand_over(&self, index: usize, nr: usize) -> Option<LockedFolio> {
        let b = self.pages.get(index)?.as_ref()?;
        if b.page != 0 || b.folio.nr_pages() != nr {
            return None;
        }
        LockedFolio::hand_over(&b.folio)
    }
}

/// A chunk slot's backing table.
type BackingTable = SpinLockIrq<Table>;

/// The lock of one backing table at a time, held across a run of lookups and copies in that
/// table: taking another table's releases it first (same lock class). The mirror's walks and
/// the migrations to system memory go through it.
pub(crate) struct TableLock<'a> {
    /// Lookups per hold at most: after that many the lock is released and taken again.
    run: usize,
    /// The table locked, its guard, and the lookups made under it.
    held: Option<(&'a BackingTable, SpinLockIrqGuard<'a, Table>, usize)>,
}

impl<'a> TableLock<'a> {
    /// A cursor that holds a table's lock until [`Self::release`] or another table's turn.
    pub(crate) fn new() -> Self {
        Self::with_run(usize::MAX)
    }

    /// A cursor that also releases a table's lock after `run` lookups under it.
    pub(crate) fn with_run(run: usize) -> Self {
        Self { run, held: None }
    }

    /// Returns `table` locked: under the lock held if it is this table's and its run is not
    /// over, else under a new hold.
    fn lock(&mut self, table: &'a BackingTable) -> &Table {
        let held = match self.held.take() {
            Some((t, guard, n)) if core::ptr::eq(t, table) && n < self.run => (t, guard, n + 1),
            // Another table's guard goes first: same lock class.
            other => {
                drop(other);
                (table, table.lock(), 1)
            }
        };
        &self.held.insert(held).1
    }

    /// Returns `table` if its lock is the one held.
    fn held(&self, table: &BackingTable) -> Option<&Table> {
        self.held
            .as_ref()
            .filter(|(t, ..)| core::ptr::eq(*t, table))
            .map(|(_, guard, _)| &**guard)
    }

    /// Releases the lock held, if any.
    pub(crate) fn release(&mut self) {
        self.held = None;
    }

    /// Returns the backing of `device`'s private `page` and the page's byte offset in it, if the
    /// page is still the allocation named, under its table's lock.
    pub(crate) fn backing(
        &mut self,
        device: &'a Device,
        page: &DevicePage,
    ) -> Option<(&OwnedFolio, usize)> {
        self.lock(device.tables.get(page.slot)?).get(page)
    }
}

/// A device-private page, named without a reference: the chunk slot of its table, its index
/// there and the generation of its allocation. Its data is reachable through
/// [`TableLock::backing`] while that allocation lasts.
#[derive(Clone, Copy)]
pub(crate) struct DevicePage {
    slot: usize,
    index: usize,
    gen: u64,
}

/// Bits of a packed [`DevicePage`] ([`DevicePage::pack`]): whether the CPU mapped it writable,
/// the slot, the index and the generation, from the lowest bit on.
const SLOT_BITS: u32 = MAX_SLOTS.trailing_zeros();
const INDEX_BITS: u32 = (CHUNK_SIZE / PAGE_SIZE).trailing_zeros();
/// The generations of a table wrap at 2^GEN_BITS (see [`Table`]).
const GEN_BITS: u32 = usize::BITS - 2 - SLOT_BITS - INDEX_BITS;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;

/// The most chunk slots (backing tables) a device has: the `max_chunks` parameter's limit.
pub(crate) const MAX_SLOTS: usize = 64;

const _: () = assert!(MAX_SLOTS.is_power_of_two() && (CHUNK_SIZE / PAGE_SIZE).is_power_of_two());
const _: () = assert!(GEN_BITS >= 40);

impl DevicePage {
    /// The page `k` pages after this one, of the same allocation.
    pub(crate) fn nth(self, k: usize) -> Self {
        Self {
            index: self.index + k,
            ..self
        }
    }

    /// The page's name and `write` in one value of a mirror leaf (at most
    /// `MirrorLeaf::MAX_VALUE`: the top bit stays clear).
    pub(crate) fn pack(self, write: bool) -> usize {
        usize::from(write)
            | self.slot << 1
            | self.index << (1 + SLOT_BITS)
            | (self.gen as usize) << (1 + SLOT_BITS + INDEX_BITS)
    }

    /// The page and `write` that [`Self::pack`] gave `v`.
    pub(crate) fn unpack(v: usize) -> (Self, bool) {
        let page = Self {
            slot: (v >> 1) & (MAX_SLOTS - 1),
            index: (v >> (1 + SLOT_BITS)) & ((1 << INDEX_BITS) - 1),
            gen: (v >> (1 + SLOT_BITS + INDEX_BITS)) as u64 & GEN_MASK,
        };
        (page, v & 1 != 0)
    }
}

/// Where the data of a new device folio goes.
pub(crate) enum Storage<'a> {
    /// Device-private memory: into its backing system folio, recorded in the chunk's table
    /// for the device folio's first page, named here.
    Backing(&'a mut LockedFolio, DevicePage),
    /// Device-coherent memory: into the device folio itself.
    Direct,
}

/// An empty backing table.
fn new_table() -> impl PinInit<BackingTable> {
    new_spinlock_irq!(
        Table {
            pages: KVVec::new(),
            gen: 0,
        },
        "dmirror::Device::tables"
    )
}

/// Allocates a locked system folio for a migration to system memory, which user space will
/// map; large ones are opportunistic (callers fall back to pages).
fn alloc_system(order: u32) -> Result<LockedFolio> {
    let flags = if order > 0 {
        GFP_HIGHUSER_MOVABLE | __GFP_NOWARN
    } else {
        GFP_HIGHUSER_MOVABLE
    };
    LockedFolio::alloc(flags, order)
}

/// Allocates the backing of a new device-private folio: kernel-owned and never migrated while
/// it backs device memory, so not movable (a movable allocation would take pageblocks from the
/// memory that compaction assembles huge pages from), although a large one becomes user memory
/// when its device folio goes back whole; large ones are opportunistic (callers fall back to
/// pages).
fn alloc_backing(order: u32) -> Result<LockedFolio> {
    let flags = if order > 0 {
        GFP_HIGHUSER | __GFP_NOWARN
    } else {
        GFP_HIGHUSER
    };
    LockedFolio::alloc(flags, order)
}

/// The data of one chunk: its slot and that slot's backing table.
#[pin_data]
pub(crate) struct Chunk {
    slot: usize,
    /// The device's table of the slot; empty for coherent memory.
    backing: Arc<BackingTable>,
    coherent: bool,
    owner: Arc<PagemapOwner<Chunk>>,
    /// Large device folios the core split into pages.
    splits: AtomicUsize,
    /// Pages a CPU fault on a page table entry migrates back at most: the naturally aligned
    /// window of this many pages around the faulting one (the `fault_around` module parameter,
    /// a power of two), this device's pages in it.
    fault_around: usize,
}

impl Chunk {
    /// The data of the chunk in `slot` of `device`; sizes the slot's table on its first use.
    fn new(device: &Device, slot: usize) -> Result<impl PinInit<Self, Error>> {
        let owner = device.owner.clone();
        let coherent = device.is_coherent();
        let fault_around = device.fault_around;
        let backing = match device.tables.get(slot) {
            Some(table) => {
                let npages = device.chunk_size / PAGE_SIZE;
                if table.lock().pages.len() < npages {
                    let mut pages = KVVec::with_capacity(npages, GFP_KERNEL)?;
                    for _ in 0..npages {
                        pages.push(None, GFP_KERNEL)?;
                    }
                    // The old (shorter, unused) one is dropped after the lock.
                    let old = core::mem::replace(&mut table.lock().pages, pages);
                    drop(old);
                }
                table.clone()
            }
            None if coherent => Arc::pin_init(new_table(), GFP_KERNEL)?,
            None => return Err(EINVAL),
        };
        Ok(try_pin_init!(Self {
            slot,
            backing,
            coherent,
            owner,
            splits: AtomicUsize::new(0),
            fault_around,
        }))
    }

    /// Returns the backing of the device page at `index`, if it is allocated.
    fn backing(&self, index: usize) -> Option<Backing> {
        self.backing.lock().pages.get(index).cloned().flatten()
    }

    /// Names the device page at `index` for a mirror entry, if it is allocated.
    pub(crate) fn device_page(&self, index: usize) -> Option<DevicePage> {
        let gen = self.backing.lock().pages.get(index)?.as_ref()?.gen;
        Some(DevicePage {
            slot: self.slot,
            index,
            gen,
        })
    }

    /// Records `folio` as the backing of the device pages from `index` on, one page each, as
    /// a new allocation; returns the first page's name.
    fn set_backing(&self, index: usize, folio: &OwnedFolio) -> DevicePage {
        let mut table = self.backing.lock();
        table.gen = (table.gen + 1) & GEN_MASK;
        let gen = table.gen;
        for page in 0..folio.nr_pages() {
            let new = Backing {
                folio: folio.clone(),
                page,
                gen,
            };
            if let Some(slot) = table.pages.get_mut(index + page) {
                // The page was free, so its slot was empty: nothing is dropped under the lock.
                *slot = Some(new);
            }
        }
        DevicePage {
            slot: self.slot,
            index,
            gen,
        }
    }

    /// Hands the backing of the device folio of `nr` pages at `index` over for a migration to
    /// system memory to take as its destination, if it is one folio of that size (it is unless
    /// the device folio was split) and the device folio's data is there (private memory).
    fn hand_over(&self, index: usize, nr: usize) -> Option<LockedFolio> {
        self.backing.lock().hand_over(index, nr)
    }

    /// Copies the data of the device page at `index` into the one-page folio `dst`; a page
    /// without backing reads as zeroes. `src` is the device folio holding the page as its page
    /// `page`: coherent memory is read there. Private memory is copied under the table's lock,
    /// which a 4 KiB copy holds briefly, rather than with a reference of its own.
    fn copy_page_to(&self, index: usize, src: &Folio, page: usize, dst: &mut LockedFolio) {
        if !self.coherent {
            return Self::copy_backing_page(&self.backing.lock(), index, dst);
        }
        // Coherent memory is memory the CPU addresses, so `as_cpu()` does not fail.
        match src.as_cpu() {
            Some(src) if dst.copy_page_from(0, src, page).is_ok() => {}
            _ => dst.zero(),
        }
    }

    /// Copies the backing of the device-private page at `index` into the one-page folio
    /// `dst`, under its table's lock (`table`); a page without backing reads as zeroes.
    fn copy_backing_page(table: &Table, index: usize, dst: &mut LockedFolio) {
        match table.pages.get(index).and_then(Option::as_ref) {
            Some(b) if dst.copy_page_from(0, &b.folio, b.page).is_ok() => {}
            _ => dst.zero(),
        }
    }

    /// Copies the data of the device pages from `index` on into `dst`, one page of `dst` each;
    /// a page without backing reads as zeroes. `src` is the device folio holding page `index`
    /// as its page `first`: coherent memory is read there.
    ///
    /// Fails with the error of [`LockedFolio::zero_page`]: `EINVAL` for a page out of `dst`'s
    /// range, which the pages it counts in `dst` are not.
    fn copy_to(&self, index: usize, src: &Folio, first: usize, dst: &mut LockedFolio) -> Result {
        let nr = dst.folio().nr_pages();
        if nr == 1 {
            self.copy_page_to(index, src, first, dst);
            return Ok(());
        }
        if self.coherent {
            // Coherent memory is memory the CPU addresses, so `as_cpu()` does not fail.
            let src = src.as_cpu();
            if first == 0
                && src.is_some_and(|src| src.nr_pages() == nr && dst.copy_from(src).is_ok())
            {
                return Ok(());
            }
            for k in 0..nr {
                match src {
                    Some(src) if dst.copy_page_from(k, src, first + k).is_ok() => {}
                    _ => dst.zero_page(k)?,
                }
            }
            return Ok(());
        }
        // The common case: a device folio copied whole into a folio of its order.
        if let Some(b) = self.backing(index) {
            if b.page == 0 && b.folio.nr_pages() == nr && dst.copy_from(&b.folio).is_ok() {
                return Ok(());
            }
        }
        for k in 0..nr {
            match self.backing(index + k) {
                Some(b) if dst.copy_page_from(k, &b.folio, b.page).is_ok() => {}
                _ => dst.zero_page(k)?,
            }
        }
        Ok(())
    }
}

/// Gives every migratable page of `mig` that is in this device's memory a system destination
/// holding its data: a folio of the source's order, or one page each when that allocation
/// fails or `fail_next()` says it must (the test ABI's FAIL_ALLOC flag), which splits the
/// device folio. Returns `ENOMEM` if a single page cannot be had (or `fail_next()` fails it);
/// no destination is given then, and dropping `mig` puts everything back.
pub(crate) fn to_system(
    mig: &mut MigrateVma<'_>,
    owner: &PagemapOwner<Chunk>,
    mut fail_next: impl FnMut() -> bool,
) -> Result<usize> {
    // The destinations, filled while the sources are borrowed from `mig`, handed over after;
    // room for one each, so that no push allocates (some happen under a spinlock).
    let mut dsts = KVec::with_capacity(mig.npages(), GFP_KERNEL)?;
    fn push(dsts: &mut KVec<(usize, LockedFolio)>, i: usize, dst: LockedFolio) -> Result {
        dsts.push_within_capacity((i, dst)).map_err(|_| ENOMEM)
    }
    // Pages given a destination.
    let mut given = 0;
    // The one-page destinations that are copied into, from one call to the page allocator
    // (made at most once a window) when the first is needed: the entries from there on that
    // are not compound take one each at most.
    let small = |from: usize| {
        (from..mig.npages())
            .filter(|&i| mig.src(i).is_migrate() && mig.src(i).has_page() && mig.span(i) == 1)
            .count()
    };
    let mut pool: Option<KVec<LockedFolio>> = None;
    // Single pages of device-private memory are handed over or copied under their table's
    // lock, held for a run of pages of one chunk (at most `COPY_RUN` of them).
    let mut tables = TableLock::with_run(COPY_RUN);
    let mut i = 0;
    while i < mig.npages() {
        let span = mig.span(i);
        let src = mig.src(i);
        let found = mig.src_folio(i).and_then(|folio| {
            let (chunk, first) = DevPagemap::<Chunk>::of_folio(folio, owner)?;
            let page = src.pfn()? - folio.pfn();
            Some((chunk.data(), first + page, folio, page))
        });
        let Some((chunk, index, folio, page)) = found.filter(|_| src.is_migrate()) else {
            i += span;
            continue;
        };
        if span == 1 {
            if fail_next() {
                return Err(ENOMEM);
            }
            // A backing page of its own becomes the destination: no copy. (Coherent memory
            // has no backing: no table lock.)
            let own = if chunk.coherent {
                tables.release();
                None
            } else {
                tables.lock(&chunk.backing).hand_over(index, 1)
            };
            if let Some(dst) = own {
                push(&mut dsts, i, dst)?;
                given += 1;
                i += 1;
                continue;
            }
            if pool.is_none() {
                // The allocation may sleep: no table lock is held over it (`copy_page_to`
                // below takes this page's).
                tables.release();
                let mut new = KVec::new();
                LockedFolio::alloc_bulk(GFP_HIGHUSER_MOVABLE, small(i), &mut new)?;
                pool = Some(new);
            }
            // Once the pool runs out (memory is short), one page at a time below.
            if let Some(mut dst) = pool.as_mut().and_then(KVec::pop) {
                match tables.held(&chunk.backing) {
                    Some(table) => Chunk::copy_backing_page(table, index, &mut dst),
                    None => chunk.copy_page_to(index, folio, page, &mut dst),
                }
                push(&mut dsts, i, dst)?;
                given += 1;
                i += 1;
                continue;
            }
        }
        // The paths below lock the table themselves.
        tables.release();
        let large = if span == 1 || fail_next() {
            None
        } else if let Some(dst) = chunk.hand_over(index, span) {
            // A backing that holds the whole folio's data becomes the destination: no copy.
            Some(dst)
        } else if let Ok(mut dst) = alloc_system(PMD_ORDER) {
            chunk.copy_to(index, folio, page, &mut dst)?;
            Some(dst)
        } else {
            None
        };
        if let Some(dst) = large {
            push(&mut dsts, i, dst)?;
            given += span;
        } else {
            for k in 0..span {
                let mut dst = alloc_system(0)?;
                chunk.copy_to(index + k, folio, page + k, &mut dst)?;
                push(&mut dsts, i + k, dst)?;
            }
            given += span;
        }
        i += span;
    }
    drop(tables);
    for (j, dst) in dsts.drain_all() {
        mig.set_dst(j, dst)?;
    }
    Ok(given)
}

/// Single pages copied under one hold of a backing table's lock, at most.
pub(crate) const COPY_RUN: usize = 64;

impl DevicePagemapOps for Chunk {
    fn folio_free(&self, folio: FreedFolio) {
        // One lock for all the pages. The backing of a large folio is one folio with a
        // reference per page: all but the last are dropped under the lock (`folio_put()` may
        // run in atomic context, and none of them is the last reference), the last after it.
        let mut last = None;
        {
            let mut table = self.backing.lock();
            let first = folio.index();
            if let Some(pages) = table.pages.get_mut(first..first + folio.nr_pages()) {
                for slot in pages {
                    if let Some(old) = slot.take() {
                        drop(last.replace(old));
                    }
                }
            }
        }
        drop(last);
    }

    fn migrate_to_ram(&self, fault: &DeviceFault<'_>) -> VmFaultCode {
        // A PMD-mapped folio goes back whole; a page table entry's page with this device's
        // other pages around it, so that a CPU walking through the range faults once per
        // window instead of once per page.
        let order = fault.order();
        let (start, end, select) = if order > 0 {
            let size = PAGE_SIZE << order;
            let start = fault.address() & !(size - 1);
            (
                start,
                start + size,
                SelectFlag::DevicePrivate | SelectFlag::Compound,
            )
        } else {
            let size = self.fault_around * PAGE_SIZE;
            let start = fault.address() & !(size - 1);
            let vma = fault.vma();
            (
                start.max(vma.start()),
                (start + size).min(vma.end()),
                Select::from(SelectFlag::DevicePrivate),
            )
        };
        let Ok(mut mig) = MigrateVma::setup_fault(fault, start, end, select) else {
            return VmFaultCode::SIGBUS;
        };
        if to_system(&mut mig, &self.owner, || false).is_err() {
            return VmFaultCode::OOM;
        }
        // Migrated, then finalised as the result drops.
        mig.pages();
        VmFaultCode::NONE
    }

    fn folio_split(&self, _head: usize, new: Option<SplitFolio>) {
        // Backing is kept per page, so the pages of a split folio keep theirs.
        if new.is_none() {
            self.splits.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn evict_copy(&self, index: usize, src: &Folio, dst: &mut LockedFolio) {
        // `dst` has the order of `src`, so every page of it is filled; an error here would be
        // a bug, and the eviction cannot fail: it is logged.
        if let Err(e) = self.copy_to(index, src, 0, dst) {
            pr_warn!("eviction copy, chunk slot {}: {:?}\n", self.slot, e);
        }
    }
}

/// The memory of a device, under its mutex.
pub(crate) struct Memory {
    /// The chunks of device memory.
    chunks: KVec<Pin<KBox<DevPagemap<Chunk>>>>,
    /// Evictions in progress: chunks taken out of `chunks` and not yet unregistered.
    releasing: usize,
    /// Keeps the module loaded while `chunks` holds memory an eviction could not take back
    /// (others hold pages of it): unloading fails with `EBUSY` rather than wait for them.
    pinned: Option<ModuleRef>,
}

/// The memory of a device, locked for a run of allocations: see [`Device::allocator`].
pub(crate) struct Allocator<'a> {
    device: &'a Device,
    memory: MutexGuard<'a, Memory>,
}

impl Allocator<'_> {
    /// Allocates a device folio of `order`, with a system folio of the same order to back it
    /// for device-private memory, and hands them to `f`, which fills the storage and passes the
    /// device folio on (to a migration). Adds a chunk when no chunk has room, up to the cap;
    /// `ENOMEM` past it, or when a large backing folio cannot be had.
    pub(crate) fn alloc(
        &mut self,
        order: u32,
        f: impl FnOnce(DeviceFolio<'_, Chunk>, Storage<'_>) -> Result,
    ) -> Result {
        let this = self.device;
        let mut backing = match this.coherent {
            Some(_) => None,
            None => Some(alloc_backing(order)?),
        };
        let chunks = &mut self.memory.chunks;
        for c in chunks.iter() {
            if let Ok(folio) = c.alloc(order) {
                return Device::fill_new(folio, backing.as_mut(), f);
            }
        }
        // No chunk has room: add one, up to the cap.
        if chunks.len() >= this.max_chunks {
            pr_debug!("hmm_dmirror{}: device memory cap reached\n", this.id);
            return Err(ENOMEM);
        }
        let data = Chunk::new(this, chunks.len())?;
        let chunk = match this.coherent {
            None => DevPagemap::new_private(data, &this.owner, CHUNK_SIZE, c"hmm_dmirror"),
            Some(range) => DevPagemap::new_coherent(
                data,
                &this.owner,
                range.part(
                    (chunks.len() * this.chunk_size) as u64,
                    this.chunk_size as u64,
                )?,
                c"hmm_dmirror",
            ),
        }
        .inspect_err(|e| pr_warn!("hmm_dmirror{}: new chunk failed: {:?}\n", this.id, e))?;
        pr_info!(
            "hmm_dmirror{}: added {} chunk {} ({} MiB) at pfn {:#x}\n",
            this.id,
            if this.is_coherent() {
                "coherent"
            } else {
                "private"
            },
            chunks.len(),
            this.chunk_size >> 20,
            chunk.base_pfn()
        );
        chunks.push(chunk, GFP_KERNEL)?;
        // Pages are only allocated under the mutex: the new chunk is still empty.
        let folio = chunks.last().ok_or(ENOMEM)?.alloc(order)?;
        Device::fill_new(folio, backing.as_mut(), f)
    }
}

/// A simulated device: its identity and its memory.
#[pin_data]
pub(crate) struct Device {
    /// The device number (the N of `/dev/hmm_dmirrorN`).
    pub(crate) id: usize,
    /// For a device-coherent device: the reserved physical range its memory comes from.
    coherent: Option<ReservedRam>,
    /// The size of each chunk.
    chunk_size: usize,
    /// The `pgmap->owner` of all its chunks.
    pub(crate) owner: Arc<PagemapOwner<Chunk>>,
    /// The backing table of each chunk slot, `max_chunks` of them for device-private memory.
    tables: KVec<Arc<BackingTable>>,
    /// The chunks of device memory.
    #[pin]
    memory: Mutex<Memory>,
    /// Notified when an eviction has unregistered the chunks it took out.
    #[pin]
    released: CondVar,
    max_chunks: usize,
    /// The fault window of its chunks, in pages (see [`Chunk`]); 1 for coherent memory, which
    /// the CPU reaches without faults.
    fault_around: usize,
    /// Open files; the last close evicts the device memory.
    opens: AtomicUsize,
    /// Evictions of the device memory that found chunks to evict.
    evictions: AtomicUsize,
    /// Device pages that a migration to system memory collected and copied, and that the core
    /// then did not move (something else held a reference: the core should have left them
    /// out when it collected them).
    pub(crate) refused: AtomicUsize,
}

impl Device {
    /// Creates device-private device `id` with room for `max_chunks` chunks, whose CPU faults
    /// migrate back windows of `fault_around` pages (a power of two); no memory is registered
    /// yet.
    pub(crate) fn new(id: usize, max_chunks: usize, fault_around: usize) -> Result<Arc<Self>> {
        if !fault_around.is_power_of_two() {
            return Err(EINVAL);
        }
        Self::build(id, None, CHUNK_SIZE, max_chunks, fault_around)
    }

    /// Creates device-coherent device `id` on `range`; its chunks are carved out of it in
    /// order, as needed.
    pub(crate) fn new_coherent(id: usize, range: ReservedRam) -> Result<Arc<Self>> {
        let size = usize::try_from(range.size()).map_err(|_| EINVAL)?;
        let chunk_size = size.min(CHUNK_SIZE);
        Self::build(id, Some(range), chunk_size, size / chunk_size, 1)
    }

    fn build(
        id: usize,
        coherent: Option<ReservedRam>,
        chunk_size: usize,
        max_chunks: usize,
        fault_around: usize,
    ) -> Result<Arc<Self>> {
        if max_chunks > MAX_SLOTS {
            return Err(EINVAL);
        }
        let owner = PagemapOwner::new()?;
        let mut tables = KVec::new();
        if coherent.is_none() {
            for _ in 0..max_chunks {
                tables.push(Arc::pin_init(new_table(), GFP_KERNEL)?, GFP_KERNEL)?;
            }
        }
        Arc::pin_init(
            try_pin_init!(Self {
                id,
                coherent,
                chunk_size,
                owner,
                tables,
                memory <- new_mutex!(
                    Memory {
                        chunks: KVec::new(),
                        releasing: 0,
                        pinned: None,
                    },
                    "dmirror::Device::memory"
                ),
                released <- new_condvar!("dmirror::Device::released"),
                max_chunks,
                fault_around,
                opens: AtomicUsize::new(0),
                evictions: AtomicUsize::new(0),
                refused: AtomicUsize::new(0),
            }),
            GFP_KERNEL,
        )
    }

    /// Returns whether the device's memory is device-coherent.
    pub(crate) fn is_coherent(&self) -> bool {
        self.coherent.is_some()
    }

    /// Returns which device pages migrations collect: this device's kind.
    pub(crate) fn select(&self) -> SelectFlag {
        if self.is_coherent() {
            SelectFlag::DeviceCoherent
        } else {
            SelectFlag::DevicePrivate
        }
    }

    /// Locks the device's memory for a run of allocations (one migration window), once no
    /// eviction is in progress.
    ///
    /// A new chunk must not be registered while evicted ones are still being unregistered: a
    /// coherent chunk would claim the same reserved range again (`EBUSY`), a private one would
    /// exceed the cap. Waiting here is safe because the caller holds no device page of this
    /// device that is not yet handed to the core: allocations happen only under this lock, a
    /// migration window takes it once and finalises before the next one, and an eviction takes
    /// chunks out only under it.
    pub(crate) fn allocator(&self) -> Allocator<'_> {
        let mut memory = self.memory.lock();
        while memory.releasing > 0 {
            self.released.wait(&mut memory);
        }
        Allocator {
            device: self,
            memory,
        }
    }

    /// Records the backing of a new device folio and hands both to `f` (see [`Self::alloc`]).
    fn fill_new(
        folio: DeviceFolio<'_, Chunk>,
        backing: Option<&mut LockedFolio>,
        f: impl FnOnce(DeviceFolio<'_, Chunk>, Storage<'_>) -> Result,
    ) -> Result {
        let chunk = folio.pagemap().data();
        match backing {
            Some(backing) => {
                let page = chunk.set_backing(folio.index(), &backing.owned());
                f(folio, Storage::Backing(backing, page))
            }
            None => f(folio, Storage::Direct),
        }
    }

    /// Writes the device's counters (the `stats` file of its debugfs directory): one
    /// `key value` line each, summed over its chunks; `docs/driver.md` says what they mean.
    pub(crate) fn write_stats(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let memory = self.memory.lock();
        let chunks = &memory.chunks;
        let mut t = Census::default();
        let mut splits = 0;
        for c in chunks.iter() {
            let n = c.census();
            t.pages += n.pages;
            t.free += n.free;
            t.allocated += n.allocated;
            t.mapped += n.mapped;
            t.small_folios += n.small_folios;
            t.large_folios += n.large_folios;
            t.large_pages += n.large_pages;
            t.free_bad_refcount += n.free_bad_refcount;
            t.bad_pgmap += n.bad_pgmap;
            splits += c.data().splits.load(Ordering::Relaxed);
        }
        let kind = if self.is_coherent() {
            "coherent"
        } else {
            "private"
        };
        writeln!(f, "kind {kind}")?;
        writeln!(f, "chunks {}", chunks.len())?;
        writeln!(f, "max_chunks {}", self.max_chunks)?;
        writeln!(f, "fault_around {}", self.fault_around)?;
        writeln!(f, "chunk_pages {}", self.chunk_size / PAGE_SIZE)?;
        writeln!(f, "pages {}", t.pages)?;
        writeln!(f, "free {}", t.free)?;
        writeln!(f, "allocated {}", t.allocated)?;
        writeln!(f, "mapped {}", t.mapped)?;
        writeln!(f, "in_flight {}", t.allocated.saturating_sub(t.mapped))?;
        writeln!(f, "small_folios {}", t.small_folios)?;
        writeln!(f, "large_folios {}", t.large_folios)?;
        writeln!(f, "large_pages {}", t.large_pages)?;
        writeln!(f, "splits {splits}")?;
        writeln!(f, "free_bad_refcount {}", t.free_bad_refcount)?;
        writeln!(f, "bad_pgmap {}", t.bad_pgmap)?;
        writeln!(f, "evictions {}", self.evictions.load(Ordering::Relaxed))?;
        writeln!(f, "refused {}", self.refused.load(Ordering::Relaxed))
    }

    /// Checks the zero-based contract on every chunk (the `check` file): every free page has
    /// reference count zero, every allocated folio points at its pagemap, and the pagemap's
    /// reference count is one per allocated page. Sleeps (an RCU grace period per chunk).
    pub(crate) fn write_check(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Held across the reads: no chunk is added or evicted, and checks are serialised.
        let memory = self.memory.lock();
        let chunks = &memory.chunks;
        let mut ok = true;
        for (n, c) in chunks.iter().enumerate() {
            let census = c.census();
            let refs = c.pgmap_refs();
            let good = census.free_bad_refcount == 0
                && census.bad_pgmap == 0
                && refs == census.allocated as i64;
            ok &= good;
            writeln!(
                f,
                "chunk {n} allocated {} pgmap_refs {refs} free_bad_refcount {} bad_pgmap {} {}",
                census.allocated,
                census.free_bad_refcount,
                census.bad_pgmap,
                if good { "ok" } else { "FAIL" }
            )?;
        }
        writeln!(f, "result {}", if ok { "ok" } else { "FAIL" })
    }

    /// Counts an open file.
    pub(crate) fn open(&self) {
        self.opens.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a closed file; the last one evicts the device memory.
    pub(crate) fn close(&self) {
        if self.opens.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Memory that cannot be evicted now stays, and goes with the next eviction.
            let _ = self.release(false);
        }
    }

    /// Evicts every page of device memory back to system memory and unregisters it.
    ///
    /// A page that someone else holds (a pin, a pipe buffer) is waited for at most
    /// [`EVICT_TIMEOUT`] in all: then the memory stays registered and in use, nothing that could
    /// not move is lost, and the error says so (`EBUSY`; `ERESTARTSYS` for a signal if
    /// `interruptible`, for the RELEASE ioctl). Until an eviction succeeds, the module cannot be
    /// unloaded (`EBUSY`): only a later RELEASE or last close lets it go.
    pub(crate) fn release(&self, interruptible: bool) -> Result {
        let chunks = {
            let mut memory = self.memory.lock();
            // Another eviction may fail and put its chunks back: wait for its outcome (at most
            // its own timeout).
            while memory.releasing > 0 {
                if interruptible {
                    if self.released.wait_interruptible(&mut memory) {
                        return Err(ERESTARTSYS);
                    }
                } else {
                    self.released.wait(&mut memory);
                }
            }
            let chunks = core::mem::take(&mut memory.chunks);
            if chunks.is_empty() {
                return Ok(());
            }
            memory.releasing += 1;
            chunks
        };
        self.evictions.fetch_add(1, Ordering::Relaxed);
        // Outside the lock: eviction may wait for migrations that need it. One timeout for
        // all the chunks.
        let started = Instant::<Monotonic>::now();
        let res = chunks.iter().try_for_each(|c| {
            let left = EVICT_TIMEOUT - started.elapsed();
            if interruptible {
                c.evict_interruptible(left)
            } else {
                c.evict(left)
            }
        });
        let kept = match res {
            Ok(()) => {
                // Every page is free: unregistering does not wait.
                drop(chunks);
                None
            }
            Err(e) => Some((chunks, e)),
        };
        let mut memory = self.memory.lock();
        if let Some((chunks, e)) = kept {
            // No chunk was added meanwhile (allocations wait for `releasing`): the chunks go
            // back as they were, each in its slot. Until an eviction takes them, the module
            // stays: its exit could only wait for whoever holds the pages.
            memory.chunks = chunks;
            if memory.pinned.is_none() {
                // Said when the memory is first kept, not on every RELEASE that fails again.
                pr_warn!(
                    "hmm_dmirror{}: device memory still in use, kept (error {}); unloading refused until it is evicted\n",
                    self.id,
                    e.to_errno()
                );
                // `pinned` is dropped here in `release()`, which runs in a file operation of a
                // dmirror device file (the RELEASE ioctl, the last close), whose `owner` reference
                // keeps the module loaded until after the operation returns, or with the device in
                // the module's exit, which cannot run while it holds a reference.
                // SAFETY: Given back only where the module is kept loaded (above), never in init.
                let pin = unsafe { kernel::module::this_module::<crate::Dmirror>().try_get() };
                memory.pinned = pin;
            }
        } else {
            memory.pinned = None;
        }
        memory.releasing -= 1;
        drop(memory);
        self.released.notify_all();
        res
    }
}
