// SPDX-License-Identifier: GPL-2.0

//! A simulated device and its memory.
//!
//! Device memory is a list of chunks, each a [`DevPagemap`] of [`CHUNK_SIZE`] bytes of
//! device-private address space registered on demand, up to the `max_chunks` module parameter.
//! A device page has no storage of its own: its contents live in a system folio, its
//! *backing*, kept in the chunk's table at the page's index while the page is allocated.
//!
//! # Locking
//!
//! `Device::chunks` (a mutex) is taken to find or add a chunk and never while a mirror lock is
//! held. Each chunk's backing table is a spinlock, taken for single lookups and updates only
//! (`folio_free` runs in atomic context). Eviction (RELEASE, last close, unload) takes the
//! chunks out of the device under the mutex and drops them after releasing it, so migrations
//! that need the mutex to allocate never wait for an eviction that waits for them.

use core::sync::atomic::{AtomicUsize, Ordering};
use kernel::{
    alloc::flags::{__GFP_NOWARN, GFP_HIGHUSER_MOVABLE, GFP_KERNEL},
    mm::{
        folio::Folio,
        memremap::{
            DevPagemap, DeviceFault, DeviceFolio, DevicePagemapOps, FreedFolio, PagemapOwner,
            SplitFolio, VmFaultCode, PMD_ORDER, SECTION_SIZE,
        },
        migrate::{LockedFolio, MigrateVma, Select},
    },
    new_mutex, new_spinlock,
    page::PAGE_SIZE,
    prelude::*,
    sync::{aref::ARef, Arc, Mutex, SpinLock},
};

/// The size of a chunk of device memory.
pub(crate) const CHUNK_SIZE: usize = 2 * SECTION_SIZE;

/// Where the data of a device page lives: page `page` of a system folio. A device folio of
/// order 9 is backed by one system folio of order 9, so its pages share it.
#[derive(Clone)]
pub(crate) struct Backing {
    pub(crate) folio: ARef<Folio>,
    pub(crate) page: usize,
}

/// The backing of every allocated device page of a chunk, by page index.
pub(crate) type BackingTable = SpinLock<KVVec<Option<Backing>>>;

/// Allocates a locked system folio; large ones are opportunistic (callers fall back to pages).
pub(crate) fn alloc_system(order: u32) -> Result<LockedFolio> {
    let flags = if order > 0 {
        GFP_HIGHUSER_MOVABLE | __GFP_NOWARN
    } else {
        GFP_HIGHUSER_MOVABLE
    };
    LockedFolio::alloc(flags, order)
}

/// The data of one chunk: its backing table, shared with mirror entries of its pages so that
/// they can tell when a page went away.
#[pin_data]
pub(crate) struct Chunk {
    backing: Arc<BackingTable>,
    owner: Arc<PagemapOwner<Chunk>>,
    /// Large device folios the core split into pages.
    splits: AtomicUsize,
}

impl Chunk {
    fn new(owner: &Arc<PagemapOwner<Chunk>>) -> Result<impl PinInit<Self, Error>> {
        let owner = owner.clone();
        let npages = CHUNK_SIZE / PAGE_SIZE;
        let mut table = KVVec::with_capacity(npages, GFP_KERNEL)?;
        for _ in 0..npages {
            table.push(None, GFP_KERNEL)?;
        }
        let backing = Arc::pin_init(new_spinlock!(table, "dmirror::Chunk::backing"), GFP_KERNEL)?;
        Ok(try_pin_init!(Self {
            backing,
            owner,
            splits: AtomicUsize::new(0),
        }))
    }

    /// Returns the backing of the device page at `index`, if it is allocated.
    pub(crate) fn backing(&self, index: usize) -> Option<Backing> {
        self.backing.lock().get(index).cloned().flatten()
    }

    /// Returns the chunk's backing table.
    pub(crate) fn table(&self) -> &Arc<BackingTable> {
        &self.backing
    }

    /// Records `folio` as the backing of the device pages from `index` on, one page each.
    fn set_backing(&self, index: usize, folio: &Folio) {
        for page in 0..folio.nr_pages() {
            let new = Backing {
                folio: ARef::from(folio),
                page,
            };
            let old = self
                .backing
                .lock()
                .get_mut(index + page)
                .map(|slot| slot.replace(new));
            // Dropped outside the lock.
            drop(old);
        }
    }

    /// Copies the data of the device pages from `index` on into `dst`, one page of `dst` each;
    /// a page without backing reads as zeroes.
    pub(crate) fn copy_to(&self, index: usize, dst: &mut LockedFolio) {
        let nr = dst.folio().nr_pages();
        if let Some(b) = self.backing(index) {
            // The common case: a device folio copied whole into a folio of its order.
            if b.page == 0 && b.folio.nr_pages() == nr && dst.copy_from(&b.folio).is_ok() {
                return;
            }
        }
        for k in 0..nr {
            let copied = match self.backing(index + k) {
                Some(b) => dst.copy_page_from(k, &b.folio, b.page),
                None => Err(ENOENT),
            };
            if copied.is_err() {
                // `k` is within `dst`, so this cannot fail.
                let _ = dst.zero_page(k);
            }
        }
    }
}

/// Gives every migratable page of `mig` that is in this device's memory a system destination
/// holding its data: a folio of the source's order, or one page each when that allocation
/// fails or `fail_next()` says it must (the test ABI's FAIL_ALLOC flag), which splits the
/// device folio. Returns `ENOMEM` if a single page cannot be had (or `fail_next()` fails it);
/// dropping `mig` then puts everything back.
pub(crate) fn to_system(
    mig: &mut MigrateVma<'_>,
    owner: &PagemapOwner<Chunk>,
    mut fail_next: impl FnMut() -> bool,
) -> Result {
    let mut i = 0;
    while i < mig.npages() {
        let span = mig.span(i);
        // Copied while the source is borrowed from `mig`, handed over after.
        let mut dsts = KVec::with_capacity(span, GFP_KERNEL)?;
        {
            let src = mig.src(i);
            let found = mig.src_folio(i).and_then(|folio| {
                let (chunk, first) = DevPagemap::<Chunk>::of_folio(folio, owner)?;
                Some((chunk.data(), first + (src.pfn()? - folio.pfn())))
            });
            let Some((chunk, index)) = found.filter(|_| src.is_migrate()) else {
                i += span;
                continue;
            };
            let large = if span == 1 {
                if fail_next() {
                    return Err(ENOMEM);
                }
                None
            } else if fail_next() {
                None
            } else {
                alloc_system(PMD_ORDER).ok()
            };
            if let Some(mut dst) = large {
                chunk.copy_to(index, &mut dst);
                dsts.push((i, dst), GFP_KERNEL)?;
            } else {
                for k in 0..span {
                    let mut dst = alloc_system(0)?;
                    chunk.copy_to(index + k, &mut dst);
                    dsts.push((i + k, dst), GFP_KERNEL)?;
                }
            }
        }
        for (j, dst) in dsts {
            mig.set_dst(j, dst)?;
        }
        i += span;
    }
    Ok(())
}

impl DevicePagemapOps for Chunk {
    fn folio_free(&self, folio: FreedFolio) {
        for k in 0..folio.nr_pages() {
            // Taken out under the lock, dropped after it.
            let old = self
                .backing
                .lock()
                .get_mut(folio.index() + k)
                .and_then(Option::take);
            drop(old);
        }
    }

    fn migrate_to_ram(&self, fault: &DeviceFault<'_>) -> VmFaultCode {
        // A PMD-mapped folio goes back whole, a page table entry's page alone.
        let order = fault.order();
        let size = PAGE_SIZE << order;
        let start = fault.address() & !(size - 1);
        let select = if order > 0 {
            Select::DEVICE_PRIVATE | Select::COMPOUND
        } else {
            Select::DEVICE_PRIVATE
        };
        let Ok(mut mig) = MigrateVma::setup(
            fault.vma(),
            start,
            start + size,
            self.owner.token(),
            select,
            Some(fault),
        ) else {
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

    fn evict_copy(&self, index: usize, dst: &mut LockedFolio) {
        self.copy_to(index, dst);
    }
}

/// A simulated device: its identity and its memory.
#[pin_data]
pub(crate) struct Device {
    /// The device number (the N of `/dev/hmm_dmirrorN`).
    pub(crate) id: usize,
    /// The `pgmap->owner` of all its chunks.
    pub(crate) owner: Arc<PagemapOwner<Chunk>>,
    /// The chunks of device memory.
    #[pin]
    chunks: Mutex<KVec<Pin<KBox<DevPagemap<Chunk>>>>>,
    max_chunks: usize,
    /// Open files; the last close evicts the device memory.
    opens: AtomicUsize,
}

impl Device {
    /// Creates device `id` with room for `max_chunks` chunks; no memory is registered yet.
    pub(crate) fn new(id: usize, max_chunks: usize) -> Result<Arc<Self>> {
        let owner = PagemapOwner::new()?;
        Arc::pin_init(
            try_pin_init!(Self {
                id,
                owner,
                chunks <- new_mutex!(KVec::new(), "dmirror::Device::chunks"),
                max_chunks,
                opens: AtomicUsize::new(0),
            }),
            GFP_KERNEL,
        )
    }

    /// Allocates a device folio of `order` and a system folio of the same order to back it,
    /// and hands both to `f`, which fills the backing and passes the device folio on (to a
    /// migration). Adds a chunk when no chunk has room, up to the cap; `ENOMEM` past it, or
    /// when a large backing folio cannot be had.
    pub(crate) fn alloc(
        &self,
        order: u32,
        f: impl FnOnce(DeviceFolio<'_, Chunk>, &mut LockedFolio, &Arc<BackingTable>) -> Result,
    ) -> Result {
        let mut backing = alloc_system(order)?;
        let mut chunks = self.chunks.lock();
        if !chunks.iter().any(|c| c.can_alloc(order)) {
            if chunks.len() >= self.max_chunks {
                pr_debug!("hmm_dmirror{}: device memory cap reached\n", self.id);
                return Err(ENOMEM);
            }
            let chunk = DevPagemap::new_private(
                Chunk::new(&self.owner)?,
                &self.owner,
                CHUNK_SIZE,
                c"hmm_dmirror",
            )
            .inspect_err(|e| pr_warn!("hmm_dmirror{}: new chunk failed: {:?}\n", self.id, e))?;
            pr_info!(
                "hmm_dmirror{}: added chunk {} ({} MiB) at pfn {:#x}\n",
                self.id,
                chunks.len(),
                CHUNK_SIZE >> 20,
                chunk.base_pfn()
            );
            chunks.push(chunk, GFP_KERNEL)?;
        }
        // Pages are only allocated under `chunks`, so the room seen above is still there.
        let folio = chunks
            .iter()
            .find_map(|c| c.alloc(order).ok())
            .ok_or(ENOMEM)?;
        let chunk = folio.pagemap().data();
        chunk.set_backing(folio.index(), backing.folio());
        let table = chunk.table().clone();
        f(folio, &mut backing, &table)
    }

    /// Counts an open file.
    pub(crate) fn open(&self) {
        self.opens.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a closed file; the last one evicts the device memory.
    pub(crate) fn close(&self) {
        if self.opens.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.release();
        }
    }

    /// Evicts every page of device memory back to system memory and unregisters it.
    pub(crate) fn release(&self) {
        let chunks = core::mem::take(&mut *self.chunks.lock());
        // Dropped outside the lock: eviction may wait for migrations that need it.
        drop(chunks);
    }
}
