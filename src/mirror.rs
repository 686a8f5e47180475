// SPDX-License-Identifier: GPL-2.0

//! The device's mirror of an opener's address space: its table, the notifier that keeps it
//! valid, and the HMM faults that fill it.
//!
//! The mirror maps page indices of the opener's address space to where the page's data is: the
//! page itself, with a reference, for system memory and coherent device memory; for a page in
//! this device's private memory, the page's name in its device's backing tables, without a
//! reference (see [`DevicePage`]): its data is reached there, under the table's lock, and only
//! while the page is still the same allocation. Entries also say whether the CPU mapping was
//! writable. They are added only under [`HmmRange::lock_if_valid`] after an HMM
//! fault, or right after a migration this file made, and are removed by every invalidation of
//! their range (but for this device's own migrations: see `Mirror`'s `invalidate`), so a device
//! access never reaches a page that is no longer mapped there: an entry of a private page
//! that such a migration moved is stale by its generation.
//!
//! The mirror's mutex (inside the notifier) is the last sleeping lock of the driver's lock
//! order, which the crate root states.

use crate::{
    device::{Chunk, Device, DevicePage, TableLock},
    file::DmirrorFile,
};
use kernel::{
    alloc::flags::GFP_KERNEL,
    mm::{
        folio::{CpuFolio, Folio},
        hmm::{FaultFlags, HmmRange, MirrorLeaf, Slot, ValidGuard, WritablePageGuard, WriteGrant},
        memremap::{DevPagemap, PagemapOwner},
        mmu_notifier::{MmuIntervalNotifier, MmuIntervalNotifierOps, NotifierEvent, NotifierRange},
        MmWithUser,
    },
    page::PAGE_SIZE,
    prelude::*,
    rbtree::{RBTree, RBTreeNodeReservation},
    sync::{aref::ARef, Arc},
    time::{Delta, Instant, Monotonic},
};

/// How long a fault retries on concurrent invalidations before giving up with `EBUSY`.
pub(crate) const FAULT_TIMEOUT_MS: i64 = 1000;

/// Ends a request that goes through a range a window at a time, between windows, when a signal
/// is pending for the caller: the ioctl is restarted (or fails with `EINTR`), so that a killed
/// process does not stay in the kernel for the rest of a long range.
pub(crate) fn check_signal() -> Result {
    if kernel::current!().signal_pending() {
        Err(ERESTARTSYS)
    } else {
        Ok(())
    }
}

/// Pages faulted per `hmm_range_fault()` call.
pub(crate) const FAULT_WINDOW: usize = 64;

/// One mirrored page, as the mirror holds it: where its data is, and what its CPU mapping
/// allowed. The mirror keeps it in one word ([`MirrorLeaf`]).
#[derive(Clone, Copy)]
pub(crate) enum Entry<'a> {
    /// System memory or coherent device memory: the folio holding the page, which the entry
    /// references, and the page's byte offset in it (a large folio maps many addresses).
    Folio {
        folio: &'a CpuFolio,
        offset: usize,
        /// This device took exclusive (atomic) access to the page. (Whether the page was
        /// mapped writable is its slot's grant: see [`find_writable`].)
        exclusive: bool,
    },
    /// A page of this device's private memory: its data is in its backing, found in the
    /// device's table while the page is the allocation named. Once the page is freed (it was
    /// migrated away, or the memory evicted) the entry is stale and reads as not mirrored.
    /// With whether the CPU mapping was writable.
    Device(DevicePage, bool),
}

/// A mirror entry to store ([`Mirror::insert`]): a folio with the page's byte offset in it, or
/// one of this device's pages.
pub(crate) enum NewEntry {
    /// Mapped read-only.
    Folio(ARef<CpuFolio>, usize),
    /// Mapped writable, with the grant that says so (and names the page).
    Writable(WriteGrant),
    /// Taken exclusive (atomic) for this device.
    Exclusive(ARef<CpuFolio>, usize),
    /// A page of this device's private memory, and whether it was mapped writable.
    Device(DevicePage, bool),
}

impl<'a> Entry<'a> {
    /// The entry a slot of the mirror holds, if any.
    fn of(slot: Slot<'a>) -> Option<Self> {
        match slot {
            Slot::Empty => None,
            Slot::Page {
                folio,
                offset,
                mark,
                ..
            } => Some(Self::Folio {
                folio,
                offset,
                exclusive: mark,
            }),
            Slot::Value(v) => {
                let (page, write) = DevicePage::unpack(v);
                Some(Self::Device(page, write))
            }
        }
    }

    /// Returns the folio holding the page's data and the page's byte offset in it; `None` for a
    /// stale entry. A page of `device`'s private memory is found in its backing table, locked
    /// with `tables` (if it is not the table held already), so that its backing stays alive
    /// while it is used: a backing is only dropped under its table's lock.
    pub(crate) fn find<'d, 'b>(
        self,
        device: &'d Device,
        tables: &'b mut TableLock<'d>,
    ) -> Option<(&'b CpuFolio, usize)>
    where
        'a: 'b,
    {
        match self {
            Self::Folio { folio, offset, .. } => Some((folio, offset)),
            Self::Device(page, _) => tables.backing(device, &page).map(|(f, o)| (&**f, o)),
        }
    }
}

/// Pages per leaf of the mirror: entries are allocated and looked up a leaf at a time. A leaf
/// of 128 one-word slots is a 1 KiB allocation, and its tree node (with the leaf's grant proof)
/// 64 bytes: 8.5 bytes a page.
pub(crate) const LEAF_PAGES: usize = 128;

/// The entries of [`LEAF_PAGES`] consecutive pages, the first at a multiple of it.
pub(crate) type Leaf = MirrorLeaf<LEAF_PAGES>;

// A tree node (three words of links, the key and the leaf) fits 64 bytes.
const _: () = assert!(core::mem::size_of::<Leaf>() <= 32);

/// Leaves allocated before the mirror lock is taken (reclaim invalidates, which takes it).
pub(crate) struct Room(KVec<(RBTreeNodeReservation<usize, Leaf>, Leaf)>);

impl Room {
    /// Room for every leaf that pages `[first, end)` span.
    pub(crate) fn new(first: usize, end: usize) -> Result<Self> {
        let n = if end > first {
            (end - 1) / LEAF_PAGES - first / LEAF_PAGES + 1
        } else {
            0
        };
        let mut v = KVec::with_capacity(n, GFP_KERNEL)?;
        for _ in 0..n {
            let leaf = Leaf::new(GFP_KERNEL)?;
            v.push((RBTreeNodeReservation::new(GFP_KERNEL)?, leaf), GFP_KERNEL)?;
        }
        Ok(Self(v))
    }
}

/// The device's view of the opener's address space, by page index.
pub(crate) struct Mirror {
    table: RBTree<usize, Leaf>,
    /// This device's memory owner.
    owner: Arc<PagemapOwner<Chunk>>,
    /// MIGRATE_TO_DEV and MIGRATE_TO_SYS windows in progress, which keep the mirror up to
    /// date themselves: see [`IoctlMigration`].
    ioctl_migrations: usize,
}

/// Marks a migration window of an ioctl as in progress for as long as it lives, so that the
/// mirror ignores the migration's own invalidations.
pub(crate) struct IoctlMigration<'a>(&'a MmuIntervalNotifier<Mirror>);

impl<'a> IoctlMigration<'a> {
    /// Marks a window of `mirror`'s file in progress.
    pub(crate) fn new(mirror: &'a MmuIntervalNotifier<Mirror>) -> Self {
        mirror.lock().ioctl_migrations += 1;
        Self(mirror)
    }
}

impl Drop for IoctlMigration<'_> {
    fn drop(&mut self) {
        self.0.lock().ioctl_migrations -= 1;
    }
}

impl Mirror {
    /// An empty mirror for a file of the device whose memory `owner` owns.
    pub(crate) fn new(owner: Arc<PagemapOwner<Chunk>>) -> Self {
        Self {
            table: RBTree::new(),
            owner,
            ioctl_migrations: 0,
        }
    }

    /// Returns leaf `key`: the entries of pages `[key * LEAF_PAGES, (key + 1) * LEAF_PAGES)`.
    pub(crate) fn leaf(&self, key: usize) -> Option<&Leaf> {
        self.table.get(&key)
    }

    /// Sets the entry of `page`, taking a leaf from `room` if it is the first of its leaf;
    /// `ENOMEM` if `room` has none left.
    pub(crate) fn insert(&mut self, page: usize, entry: NewEntry, room: &mut Room) -> Result {
        let key = page / LEAF_PAGES;
        if let Some(leaf) = self.table.get_mut(&key) {
            return store(leaf, page % LEAF_PAGES, entry);
        }
        let (node, mut leaf) = room.0.pop().ok_or(ENOMEM)?;
        store(&mut leaf, page % LEAF_PAGES, entry)?;
        self.table.insert(node.into_node(key, leaf));
        Ok(())
    }

    /// Returns whether an entry of pages `[first, end)` satisfies `which`.
    pub(crate) fn any(&self, first: usize, end: usize, which: impl Fn(Entry<'_>) -> bool) -> bool {
        let mut next = first / LEAF_PAGES;
        while let Some(c) = self.table.cursor_lower_bound(&next) {
            let (&key, leaf) = c.current();
            let base = key * LEAF_PAGES;
            if base >= end {
                break;
            }
            let (lo, hi) = (first.saturating_sub(base), (end - base).min(LEAF_PAGES));
            if (lo..hi).filter_map(|i| entry(leaf, i)).any(&which) {
                return true;
            }
            next = key + 1;
        }
        false
    }

    /// Removes the entries of pages `[first, end)` for which `which` returns true; frees
    /// leaves left empty.
    pub(crate) fn remove(
        &mut self,
        first: usize,
        end: usize,
        mut which: impl FnMut(Entry<'_>) -> bool,
    ) {
        let mut cursor = self.table.cursor_lower_bound_mut(&(first / LEAF_PAGES));
        while let Some(mut c) = cursor {
            let (&key, leaf) = c.current_mut();
            let base = key * LEAF_PAGES;
            if base >= end {
                break;
            }
            let (lo, hi) = (first.saturating_sub(base), (end - base).min(LEAF_PAGES));
            leaf.clear_if(lo..hi, |slot| Entry::of(slot).is_some_and(&mut which));
            cursor = if leaf.is_empty() {
                // Removing the last leaf leaves the cursor on the one before: done then.
                c.remove_current().0.filter(|next| *next.current().0 > key)
            } else {
                c.move_next()
            };
        }
    }
}

/// The entry of slot `i` of `leaf`, if it is mirrored.
pub(crate) fn entry(leaf: &Leaf, i: usize) -> Option<Entry<'_>> {
    Entry::of(leaf.get(i))
}

/// Like [`Entry::find`], for the entry of slot `i` of `leaf` if the device may write it, with
/// its folio locked: `None` for a page that is not mirrored, read-only or exclusive, a writable
/// one whose grant `valid` (the mirror's lock, checked for the current sequence number) does not
/// prove current, and a folio locked elsewhere.
pub(crate) fn find_writable<'a, 'b>(
    leaf: &'b Leaf,
    i: usize,
    device: &'a Device,
    tables: &'b mut TableLock<'a>,
    valid: &'b ValidGuard<'_, Mirror>,
) -> Option<WritablePageGuard<'b>> {
    // A page slot writes only with its grant, which exclusive entries never have.
    if let Some(page) = leaf.writable(i, valid) {
        return page.try_lock();
    }
    let Some(Entry::Device(page, true)) = entry(leaf, i) else {
        return None;
    };
    // The backing is the device's own memory: it writes any page of it.
    let (backing, offset) = tables.backing(device, &page)?;
    WritablePageGuard::from_guard(backing.try_lock()?, offset)
}

/// Stores `entry` in slot `i` of `leaf`.
fn store(leaf: &mut Leaf, i: usize, entry: NewEntry) -> Result {
    match entry {
        NewEntry::Folio(folio, offset) => leaf.set_page(i, folio, offset, false),
        NewEntry::Writable(grant) => leaf.set_grant(i, grant, false),
        NewEntry::Exclusive(folio, offset) => leaf.set_page(i, folio, offset, true),
        NewEntry::Device(page, write) => leaf.set_value(i, page.pack(write)),
    }
}

impl MmuIntervalNotifierOps for Mirror {
    /// Taking exclusive access for this device: only [`DmirrorFile::exclusive`] does, which
    /// mirrors the page itself (a CPU access that ends the exclusive access invalidates it as a
    /// clear, with no owner).
    fn own_exclusive(state: &Self, range: &NotifierRange<'_>) -> bool {
        range.owner() == state.owner.token()
    }

    fn invalidate(state: &mut Self, range: &NotifierRange<'_>) {
        // This device's own migrations: those of the ioctls update the mirror themselves (see
        // `migrate_to_dev`, `migrate_to_sys`). A CPU fault brings device pages back: their
        // entries would go stale and take room until the next invalidation, so they go now.
        // (A fault during an ioctl's window leaves them stale, which their generation tells.)
        if range.event() == NotifierEvent::Migrate && range.owner() == state.owner.token() {
            if state.ioctl_migrations == 0 {
                state.remove(
                    range.start() / PAGE_SIZE,
                    range.end().div_ceil(PAGE_SIZE),
                    |e| matches!(e, Entry::Device(..)),
                );
            }
            return;
        }
        state.remove(
            range.start() / PAGE_SIZE,
            range.end().div_ceil(PAGE_SIZE),
            |_| true,
        );
    }
}

impl DmirrorFile {
    /// The mirror entry of page `i` of a faulted range: the folio holding its data (itself,
    /// writable if the page table maps it so, or read-only), or the name of one of this
    /// device's pages; `None` for a page that is neither.
    pub(crate) fn mirror_entry(
        &self,
        range: &HmmRange<'_, Mirror>,
        i: usize,
        valid: &ValidGuard<'_, Mirror>,
    ) -> Option<NewEntry> {
        let pfn = range.pfns().get(i)?;
        let offset = |folio: &Folio| (pfn.pfn() - folio.pfn()) * PAGE_SIZE;
        // System memory and coherent device memory hold their data themselves.
        if let Some(grant) = range.write_grant(i, valid) {
            Some(NewEntry::Writable(grant))
        } else if let Some(folio) = range.cpu_folio(i, valid) {
            let offset = offset(&folio);
            Some(NewEntry::Folio(folio, offset))
        } else {
            let folio = range.folio(i, valid)?;
            let (chunk, index) = DevPagemap::<Chunk>::of_folio(&folio, &self.device.owner)?;
            let page = chunk
                .data()
                .device_page(index + offset(&folio) / PAGE_SIZE)?;
            Some(NewEntry::Device(page, pfn.is_writable()))
        }
    }

    /// Faults `[start, end)` into the mirror, readable or writable.
    pub(crate) fn fault(
        &self,
        mm: &MmWithUser,
        start: usize,
        end: usize,
        write: bool,
        unlocked: bool,
    ) -> Result {
        let flags = if write {
            FaultFlags::WRITE
        } else {
            FaultFlags::READ
        };
        let mut addr = start;
        while addr < end {
            check_signal()?;
            let n = ((end - addr) / PAGE_SIZE).min(FAULT_WINDOW);
            self.fault_window(mm, addr, n, flags, write, unlocked)?;
            addr += n * PAGE_SIZE;
        }
        Ok(())
    }

    /// Faults the `n` pages from `start` into the mirror (see [`Self::fault`]); `EBUSY` when
    /// concurrent invalidations keep it from completing for [`FAULT_TIMEOUT_MS`].
    fn fault_window(
        &self,
        mm: &MmWithUser,
        start: usize,
        n: usize,
        flags: FaultFlags,
        write: bool,
        unlocked: bool,
    ) -> Result {
        let started = Instant::<Monotonic>::now();
        // This device's own pages are reported, not faulted; but a write to one that is
        // mapped read-only (shared copy-on-write after fork) needs the CPU's write fault, so
        // that window is faulted again as any other memory, which brings the page back.
        let mut owner = Some(&*self.device.owner);
        loop {
            let left = Delta::from_millis(FAULT_TIMEOUT_MS) - started.elapsed();
            if left.as_nanos() <= 0 {
                return Err(EBUSY);
            }
            let range = if unlocked {
                HmmRange::fault_unlocked(&self.mirror, mm, start, n, flags, owner, left)
            } else {
                let seq = self.mirror.read_begin();
                let mmap = mm.mmap_read_lock();
                HmmRange::fault(&self.mirror, &mmap, seq, start, n, flags, owner)
            };
            let range = match range {
                Err(e) if e == EBUSY => continue,
                r => r?,
            };
            // Allocated before the mirror lock: reclaim invalidates, which takes that lock.
            let first = start / PAGE_SIZE;
            let mut room = Room::new(first, first + n)?;
            let mut entries = KVec::with_capacity(n, GFP_KERNEL)?;
            let Some(valid) = range.lock_if_valid() else {
                continue;
            };
            if write && owner.is_some() && range.pfns().iter().any(|p| !p.is_writable()) {
                owner = None;
                continue;
            }
            for (i, pfn) in range.pfns().iter().enumerate() {
                if pfn.is_error() || !pfn.is_valid() {
                    return Err(EFAULT);
                }
                if write && !pfn.is_writable() {
                    return Err(EPERM);
                }
                let entry = self.mirror_entry(&range, i, &valid).ok_or(EFAULT)?;
                entries.push_within_capacity(entry).map_err(|_| ENOMEM)?;
            }
            let mut mirror = valid;
            for (i, entry) in entries.into_iter().enumerate() {
                mirror.insert(first + i, entry, &mut room)?;
            }
            return Ok(());
        }
    }
}
