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
    alloc::flags::{GFP_HIGHUSER_MOVABLE, GFP_KERNEL},
    mm::{
        folio::Folio,
        memremap::{
            DevPagemap, DeviceFault, DeviceFolio, DevicePagemapOps, FreedFolio, PagemapOwner,
            VmFaultCode, SECTION_SIZE,
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

/// The backing folio of every allocated device page of a chunk, by page index.
pub(crate) type BackingTable = SpinLock<KVVec<Option<ARef<Folio>>>>;

/// The data of one chunk: its backing table, shared with mirror entries of its pages so that
/// they can tell when a page went away.
#[pin_data]
pub(crate) struct Chunk {
    backing: Arc<BackingTable>,
    owner: Arc<PagemapOwner<Chunk>>,
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
        Ok(try_pin_init!(Self { backing, owner }))
    }

    /// Returns the backing folio of the device page at `index`, if it is allocated.
    pub(crate) fn backing(&self, index: usize) -> Option<ARef<Folio>> {
        self.backing.lock().get(index).cloned().flatten()
    }

    /// Returns the chunk's backing table.
    pub(crate) fn table(&self) -> &Arc<BackingTable> {
        &self.backing
    }

    fn set_backing(&self, index: usize, folio: ARef<Folio>) {
        let old = self
            .backing
            .lock()
            .get_mut(index)
            .map(|slot| slot.replace(folio));
        drop(old);
    }
}

impl DevicePagemapOps for Chunk {
    fn folio_free(&self, folio: FreedFolio) {
        // Taken out under the lock, dropped after it.
        let old = self
            .backing
            .lock()
            .get_mut(folio.index())
            .and_then(Option::take);
        drop(old);
    }

    fn migrate_to_ram(&self, fault: &DeviceFault<'_>) -> VmFaultCode {
        let addr = fault.address() & !(PAGE_SIZE - 1);
        let Ok(mut mig) = MigrateVma::setup(
            fault.vma(),
            addr,
            addr + PAGE_SIZE,
            self.owner.token(),
            Select::DEVICE_PRIVATE,
            Some(fault),
        ) else {
            return VmFaultCode::SIGBUS;
        };
        if mig.src(0).is_migrate() {
            let Ok(mut dst) = LockedFolio::alloc(GFP_HIGHUSER_MOVABLE, 0) else {
                return VmFaultCode::OOM;
            };
            match self.backing(fault.index()) {
                Some(backing) if dst.copy_from(&backing).is_ok() => {}
                _ => dst.zero(),
            }
            if mig.set_dst(0, dst).is_err() {
                return VmFaultCode::SIGBUS;
            }
            mig.pages();
        }
        VmFaultCode::NONE
    }

    fn evict_copy(&self, index: usize, dst: &mut LockedFolio) {
        match self.backing(index) {
            Some(backing) if dst.copy_from(&backing).is_ok() => {}
            _ => dst.zero(),
        }
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

    /// Allocates `n` device pages, each with a new backing folio, and hands both to
    /// `f(i, backing, page)`, which fills the backing and passes the page on (to a migration).
    /// Adds chunks as needed; fails with `ENOMEM` past the cap, after handing out what fit.
    pub(crate) fn alloc_pages(
        &self,
        n: usize,
        mut f: impl FnMut(usize, &mut LockedFolio, DeviceFolio<'_, Chunk>, &Arc<BackingTable>) -> Result,
    ) -> Result {
        let mut chunks = self.chunks.lock();
        for i in 0..n {
            if !chunks.iter().any(|c| c.nr_free() > 0) {
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
            // Pages are only allocated under `chunks`, so the free page seen above is there.
            let folio = chunks.iter().find_map(|c| c.alloc(0).ok()).ok_or(ENOMEM)?;
            let mut backing = LockedFolio::alloc(GFP_HIGHUSER_MOVABLE, 0)?;
            folio
                .pagemap()
                .data()
                .set_backing(folio.index(), ARef::from(backing.folio()));
            let table = folio.pagemap().data().table().clone();
            f(i, &mut backing, folio, &table)?;
        }
        Ok(())
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
