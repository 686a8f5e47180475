// SPDX-License-Identifier: GPL-2.0

//! An open `/dev/hmm_dmirrorN`: the device's mirror of the opener's address space, and the
//! ioctls of `lib/test_hmm_uapi.h`.
//!
//! # The mirror
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
//! # Locking
//!
//! The mirror's mutex (inside the notifier) is taken last: nothing that may sleep on memory
//! reclaim or on a page lock runs under it (mirror leaves are allocated before it is taken,
//! folio locks are only tried), since reclaim and migrations invalidate, and invalidation
//! takes this mutex.

use crate::{
    device::{to_system, Chunk, Device, DevicePage, Storage, Table},
    uapi::{self, prot, Cmd},
};
use core::sync::atomic::{AtomicU64, Ordering};
use kernel::{
    alloc::flags::{__GFP_ZERO, GFP_KERNEL},
    fs::File,
    miscdevice::{MiscDevice, MiscDeviceRegistration},
    mm::{
        folio::{CpuFolio, Folio, FolioGuard, WritableFolio},
        hmm::{make_device_exclusive, FaultFlags, HmmRange, ValidGuard},
        memremap::{DevPagemap, DeviceFolio, PagemapOwner, PMD_ORDER},
        migrate::{LockedFolio, MigrateVma, Select, COMPOUND_PAGES},
        mmu_notifier::{MmuIntervalNotifier, MmuIntervalNotifierOps, NotifierEvent, NotifierRange},
        virt::VmaNew,
        Mm, MmWithUser, MmapReadGuard,
    },
    page::{Page, PAGE_SIZE},
    prelude::*,
    rbtree::{RBTree, RBTreeNodeReservation},
    sync::{aref::ARef, Arc, SpinLockIrqGuard},
    time::{Delta, Instant, Monotonic},
    uaccess::{UserPtr, UserSlice},
};

/// How long a fault retries on concurrent invalidations before giving up with `EBUSY`.
const FAULT_TIMEOUT_MS: i64 = 1000;

/// Pages per bounce buffer between the mirror and user memory (512 KiB).
const BOUNCE_PAGES: usize = 128;

/// Checks that the user memory at `cmd.ptr` for the command's range does not wrap around the
/// address space (`EFAULT`, as `copy_to_user()` would fail it), so that page addresses in it
/// can be computed.
fn check_user_range(cmd: &Cmd) -> Result {
    usize::try_from(cmd.npages)
        .ok()
        .and_then(|n| n.checked_mul(PAGE_SIZE))
        .and_then(|len| (cmd.ptr as usize).checked_add(len))
        .map(|_| ())
        .ok_or(EFAULT)
}

/// The user memory for pages `[first, end)` of a command's buffer at `ptr` (checked by
/// [`check_user_range`]).
fn user_pages(ptr: usize, first: usize, end: usize) -> UserSlice {
    UserSlice::new(
        UserPtr::from_addr(ptr + first * PAGE_SIZE),
        (end - first) * PAGE_SIZE,
    )
}

/// Pages faulted per `hmm_range_fault()` call.
const FAULT_WINDOW: usize = 64;

/// Bytes migrated per `migrate_vma` call: one page table, PMD-aligned.
const MIGRATE_WINDOW_SIZE: usize = COMPOUND_PAGES * PAGE_SIZE;

/// One mirrored page.
struct Entry {
    /// Where the page's data is.
    data: Data,
    /// Whether the CPU mapping was writable.
    write: bool,
    /// Whether the page is mapped device-exclusive (atomic) for this device.
    atomic: bool,
}

/// Where a mirrored page's data is.
enum Data {
    /// System memory or coherent device memory the page table maps read-only (or this device
    /// took exclusive access to): the folio holding the page, and the page's byte offset in it
    /// (a large folio maps many addresses).
    Folio(ARef<CpuFolio>, usize),
    /// The same, mapped writable: the device may write it.
    Writable(ARef<WritableFolio>, usize),
    /// A page of this device's private memory: its data is in its backing, found in the
    /// device's table while the page is the allocation named. Once the page is freed (it was
    /// migrated away, or the memory evicted) the entry is stale and reads as not mirrored.
    Device(DevicePage),
}

/// Finds the data of mirror entries, holding the lock of the backing table of the last
/// device-private page found, so that its backing stays alive while it is used: a backing is
/// only dropped under its table's lock.
struct Tables<'a> {
    device: &'a Device,
    held: Option<(usize, SpinLockIrqGuard<'a, Table>)>,
}

impl<'a> Tables<'a> {
    fn new(device: &'a Device) -> Self {
        Self { device, held: None }
    }

    /// Returns the folio holding the data of `entry` and the page's byte offset in it; `None`
    /// for a stale entry. Locks the page's table (if it is not the one held already).
    fn find<'b>(&'b mut self, entry: &'b Entry) -> Option<(&'b CpuFolio, usize)> {
        match &entry.data {
            Data::Folio(folio, offset) => Some((folio, *offset)),
            Data::Writable(folio, offset) => Some((folio, *offset)),
            Data::Device(page) => self.backing(page).map(|(f, o)| (&**f, o)),
        }
    }

    /// Like [`Tables::find`], for an entry the device may write: `None` for a read-only one.
    fn find_writable<'b>(&'b mut self, entry: &'b Entry) -> Option<(&'b WritableFolio, usize)> {
        match &entry.data {
            Data::Folio(..) => None,
            Data::Writable(folio, offset) => Some((folio, *offset)),
            Data::Device(page) => self.backing(page),
        }
    }

    /// Returns the backing of this device's `page` and the page's offset in it, if the page is
    /// still the allocation named, under its table's lock.
    fn backing<'b>(&'b mut self, page: &DevicePage) -> Option<(&'b WritableFolio, usize)> {
        if self
            .held
            .as_ref()
            .is_none_or(|(slot, _)| *slot != page.slot)
        {
            // The guard of another table goes first: same lock class.
            self.held = None;
            self.held = Some((page.slot, self.device.table(page.slot)?.lock()));
        }
        self.held.as_ref()?.1.get(page)
    }

    /// Releases the lock held, if any: called at least once a leaf.
    fn release(&mut self) {
        self.held = None;
    }
}

/// Pages per leaf of the mirror: entries are allocated and looked up a leaf at a time.
const LEAF_PAGES: usize = 64;

/// The entries of [`LEAF_PAGES`] consecutive pages, the first at a multiple of it.
type Leaf = KBox<[Option<Entry>; LEAF_PAGES]>;

/// Leaves allocated before the mirror lock is taken (reclaim invalidates, which takes it).
struct Room(KVec<(RBTreeNodeReservation<usize, Leaf>, Leaf)>);

impl Room {
    /// Room for every leaf that pages `[first, end)` span.
    fn new(first: usize, end: usize) -> Result<Self> {
        let n = if end > first {
            (end - 1) / LEAF_PAGES - first / LEAF_PAGES + 1
        } else {
            0
        };
        let mut v = KVec::with_capacity(n, GFP_KERNEL)?;
        for _ in 0..n {
            let leaf = KBox::init(pin_init::init_array_from_fn(|_| None), GFP_KERNEL)?;
            v.push((RBTreeNodeReservation::new(GFP_KERNEL)?, leaf), GFP_KERNEL)?;
        }
        Ok(Self(v))
    }
}

/// The device's view of the opener's address space, by page index.
struct Mirror {
    table: RBTree<usize, Leaf>,
    /// This device's memory owner.
    owner: Arc<PagemapOwner<Chunk>>,
    /// MIGRATE_TO_DEV and MIGRATE_TO_SYS windows in progress, which keep the mirror up to
    /// date themselves: see [`IoctlMigration`].
    ioctl_migrations: usize,
}

/// Marks a migration window of an ioctl as in progress for as long as it lives, so that the
/// mirror ignores the migration's own invalidations.
struct IoctlMigration<'a>(&'a MmuIntervalNotifier<Mirror>);

impl<'a> IoctlMigration<'a> {
    fn new(mirror: &'a MmuIntervalNotifier<Mirror>) -> Self {
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
    fn leaf(&self, key: usize) -> Option<&[Option<Entry>; LEAF_PAGES]> {
        self.table.get(&key).map(|l| &**l)
    }

    fn get(&self, page: usize) -> Option<&Entry> {
        self.table.get(&(page / LEAF_PAGES))?[page % LEAF_PAGES].as_ref()
    }

    /// Sets the entry of `page`, taking a leaf from `room` if it is the first of its leaf;
    /// `ENOMEM` if `room` has none left.
    fn insert(&mut self, page: usize, entry: Entry, room: &mut Room) -> Result {
        let key = page / LEAF_PAGES;
        if let Some(leaf) = self.table.get_mut(&key) {
            leaf[page % LEAF_PAGES] = Some(entry);
            return Ok(());
        }
        let (node, mut leaf) = room.0.pop().ok_or(ENOMEM)?;
        leaf[page % LEAF_PAGES] = Some(entry);
        self.table.insert(node.into_node(key, leaf));
        Ok(())
    }

    /// Returns whether an entry of pages `[first, end)` satisfies `which`.
    fn any(&self, first: usize, end: usize, which: impl Fn(&Entry) -> bool) -> bool {
        let mut next = first / LEAF_PAGES;
        while let Some(c) = self.table.cursor_lower_bound(&next) {
            let (&key, leaf) = c.current();
            let base = key * LEAF_PAGES;
            if base >= end {
                break;
            }
            let (lo, hi) = (first.saturating_sub(base), (end - base).min(LEAF_PAGES));
            if leaf[lo..hi].iter().flatten().any(&which) {
                return true;
            }
            next = key + 1;
        }
        false
    }

    /// Removes the entries of pages `[first, end)` for which `which` returns true; frees
    /// leaves left empty.
    fn remove(&mut self, first: usize, end: usize, mut which: impl FnMut(&Entry) -> bool) {
        let mut cursor = self.table.cursor_lower_bound_mut(&(first / LEAF_PAGES));
        while let Some(mut c) = cursor {
            let (&key, leaf) = c.current_mut();
            let base = key * LEAF_PAGES;
            if base >= end {
                break;
            }
            let (lo, hi) = (first.saturating_sub(base), (end - base).min(LEAF_PAGES));
            for slot in &mut leaf[lo..hi] {
                if slot.as_ref().is_some_and(&mut which) {
                    *slot = None;
                }
            }
            cursor = if leaf.iter().all(Option::is_none) {
                // Removing the last leaf leaves the cursor on the one before: done then.
                c.remove_current().0.filter(|next| *next.current().0 > key)
            } else {
                c.move_next()
            };
        }
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
                    |e| matches!(e.data, Data::Device(_)),
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

/// A temporary notifier's state for SNAPSHOT: nothing to tear down.
struct Snapshot;

impl MmuIntervalNotifierOps for Snapshot {
    fn invalidate(_state: &mut Self, _range: &NotifierRange<'_>) {}
}

/// An open device file.
#[pin_data]
pub(crate) struct DmirrorFile {
    device: Arc<Device>,
    mm: ARef<Mm>,
    flags: AtomicU64,
    #[pin]
    mirror: MmuIntervalNotifier<Mirror>,
}

/// A bounce buffer between the mirror and user memory, for user pages that are not present:
/// allocated on first use, zeroed, room for [`BOUNCE_PAGES`] pages.
struct Bounce(Option<KVVec<u8>>);

impl Bounce {
    fn new() -> Self {
        Self(None)
    }

    /// Returns the first `npages` pages of the buffer (at most [`BOUNCE_PAGES`]).
    fn get(&mut self, npages: usize) -> Result<&mut [u8]> {
        let len = npages.min(BOUNCE_PAGES) * PAGE_SIZE;
        let buf = match &mut self.0 {
            Some(buf) => buf,
            none => {
                let mut v = KVVec::with_capacity(BOUNCE_PAGES * PAGE_SIZE, GFP_KERNEL)?;
                v.resize(BOUNCE_PAGES * PAGE_SIZE, 0, GFP_KERNEL)?;
                none.insert(v)
            }
        };
        Ok(&mut buf[..len])
    }
}

/// A locked folio a migration fills: a backing system folio or a coherent device folio.
trait Sink {
    fn copy_from(&mut self, src: &CpuFolio) -> Result;
    fn copy_page_from(&mut self, n: usize, src: &CpuFolio, m: usize) -> Result;
    fn zero(&mut self) -> Result;
}

impl Sink for LockedFolio {
    fn copy_from(&mut self, src: &CpuFolio) -> Result {
        LockedFolio::copy_from(self, src)
    }

    fn copy_page_from(&mut self, n: usize, src: &CpuFolio, m: usize) -> Result {
        LockedFolio::copy_page_from(self, n, src, m)
    }

    fn zero(&mut self) -> Result {
        LockedFolio::zero(self);
        Ok(())
    }
}

impl Sink for DeviceFolio<'_, Chunk> {
    fn copy_from(&mut self, src: &CpuFolio) -> Result {
        DeviceFolio::copy_from(self, src)
    }

    fn copy_page_from(&mut self, n: usize, src: &CpuFolio, m: usize) -> Result {
        DeviceFolio::copy_page_from(self, n, src, m)
    }

    fn zero(&mut self) -> Result {
        DeviceFolio::zero(self)
    }
}

/// Whether a migration source is anonymous system memory: what moves to device memory (the
/// core leaves page cache folios where they are, so they are not copied either).
fn is_anon_system(folio: &Folio) -> bool {
    !folio.is_zone_device() && folio.is_anon_or_device()
}

/// Copies the source data of migration entries `[i, i + n)` into `dst`, a folio of `n` pages;
/// holes read as zeroes. The sources are system memory (MIGRATE_TO_DEV selects nothing else):
/// `EINVAL` for one the CPU cannot address.
fn copy_source(mig: &MigrateVma<'_>, i: usize, n: usize, dst: &mut impl Sink) -> Result {
    let source = match mig.source(i) {
        Some((folio, first)) => Some((folio.as_cpu().ok_or(EINVAL)?, first)),
        None => None,
    };
    match source {
        Some((src, 0)) if src.nr_pages() == n => dst.copy_from(src),
        Some((src, first)) => {
            for k in 0..n {
                dst.copy_page_from(k, src, first + k)?;
            }
            Ok(())
        }
        None => dst.zero(),
    }
}

impl DmirrorFile {
    fn mm_user(&self, gone: Error) -> Result<ARef<MmWithUser>> {
        self.mm.mmget_not_zero().ok_or(gone)
    }

    /// Takes the one-shot FAIL_ALLOC flag: true if the next allocation must fail.
    fn take_fail_alloc(&self) -> bool {
        // A load first: the flag is almost never set, and this runs for every page.
        self.flags.load(Ordering::Relaxed) & uapi::FLAG_FAIL_ALLOC != 0
            && self
                .flags
                .fetch_and(!uapi::FLAG_FAIL_ALLOC, Ordering::Relaxed)
                & uapi::FLAG_FAIL_ALLOC
                != 0
    }

    /// The mirror entry of page `i` of a faulted range: the folio holding its data (itself,
    /// writable if the page table maps it so, or read-only), or the name of one of this
    /// device's pages; `None` for a page that is neither.
    fn mirror_entry(
        &self,
        range: &HmmRange<'_, Mirror>,
        i: usize,
        valid: &ValidGuard<'_, Mirror>,
    ) -> Option<Entry> {
        let pfn = range.pfns().get(i)?;
        let offset = |folio: &Folio| (pfn.pfn() - folio.pfn()) * PAGE_SIZE;
        // System memory and coherent device memory hold their data themselves.
        let data = if let Some(folio) = range.writable_folio(i, valid) {
            let offset = offset(&folio);
            Data::Writable(folio, offset)
        } else if let Some(folio) = range.cpu_folio(i, valid) {
            let offset = offset(&folio);
            Data::Folio(folio, offset)
        } else {
            let folio = range.folio(i, valid)?;
            let (chunk, index) = DevPagemap::<Chunk>::of_folio(&folio, &self.device.owner)?;
            Data::Device(
                chunk
                    .data()
                    .device_page(index + offset(&folio) / PAGE_SIZE)?,
            )
        };
        Some(Entry {
            data,
            write: pfn.is_writable(),
            atomic: false,
        })
    }

    /// Faults `[start, end)` into the mirror, readable or writable.
    fn fault(
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
            let n = ((end - addr) / PAGE_SIZE).min(FAULT_WINDOW);
            self.fault_window(mm, addr, n, flags, write, unlocked)?;
            addr += n * PAGE_SIZE;
        }
        Ok(())
    }

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
            if started.elapsed() > Delta::from_millis(FAULT_TIMEOUT_MS) {
                return Err(EBUSY);
            }
            let range = if unlocked {
                HmmRange::fault_unlocked(&self.mirror, mm, start, n, flags, owner, 0)
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

    /// Copies mirrored pages `[first, end)` of the range at `addr` into `buf`, which holds
    /// `end - first` pages, stopping at the first page that is not mirrored. Returns the index
    /// of the page it stopped at (`end` when all were copied).
    fn copy_out(&self, addr: usize, first: usize, end: usize, buf: &mut [u8]) -> Result<usize> {
        self.walk_out(addr, first, end, |i, folio, offset| {
            let at = (i - first) * PAGE_SIZE;
            folio.read(offset, &mut buf[at..at + PAGE_SIZE])?;
            Ok(true)
        })
    }

    /// Calls `f(i, folio, offset)` under the mirror lock for each live mirrored page `i` of
    /// `[first, end)` of the range at `addr`, in order, with the folio holding its data and its
    /// byte offset there, until a page is not mirrored or `f` returns false. Returns the index
    /// of the page it stopped at (`end` when it did not). `f` may run under a backing table's
    /// spinlock: it must not sleep.
    fn walk_out(
        &self,
        addr: usize,
        first: usize,
        end: usize,
        mut f: impl FnMut(usize, &CpuFolio, usize) -> Result<bool>,
    ) -> Result<usize> {
        let mirror = self.mirror.lock();
        let mut tables = Tables::new(&self.device);
        let base = addr / PAGE_SIZE;
        // The current leaf, looked up once.
        let mut leaf: Option<(usize, &[Option<Entry>; LEAF_PAGES])> = None;
        for i in first..end {
            let page = base + i;
            let key = page / LEAF_PAGES;
            if leaf.is_none_or(|(k, _)| k != key) {
                tables.release();
                leaf = mirror.leaf(key).map(|l| (key, l));
            }
            let Some((folio, offset)) = leaf
                .and_then(|(_, l)| l[page % LEAF_PAGES].as_ref())
                .and_then(|entry| tables.find(entry))
            else {
                return Ok(i);
            };
            if !f(i, folio, offset)? {
                return Ok(i);
            }
        }
        Ok(end)
    }

    /// Copies mirrored pages `[first, npages)` of the range at `addr` to the user memory at
    /// `ptr` (page `i` to `ptr + i * PAGE_SIZE`), stopping at the first page that is not
    /// mirrored; returns the index of that page (`npages` when all were copied).
    ///
    /// Pages are copied straight from the mirrored folio under the mirror lock, with page
    /// faults disabled (a fault would invalidate, which takes the lock). From a user page that
    /// is not present on, a window goes through `bounce` instead, copied out under the lock and
    /// to user memory after it, faulting as needed.
    fn copy_to_user(
        &self,
        addr: usize,
        ptr: usize,
        first: usize,
        npages: usize,
        bounce: &mut Bounce,
    ) -> Result<usize> {
        let mut done = first;
        while done < npages {
            let mut out = user_pages(ptr, done, npages).writer();
            let mut not_present = false;
            done = self.walk_out(addr, done, npages, |_, folio, offset| {
                not_present = folio
                    .copy_to_user_nofault(offset, PAGE_SIZE, &mut out)
                    .is_err();
                Ok(!not_present)
            })?;
            if !not_present {
                return Ok(done);
            }
            let end = (done + BOUNCE_PAGES).min(npages);
            let buf = bounce.get(end - done)?;
            let copied = self.copy_out(addr, done, end, buf)?;
            user_pages(ptr, done, copied)
                .writer()
                .write_slice(&buf[..(copied - done) * PAGE_SIZE])?;
            if copied < end {
                return Ok(copied);
            }
            done = end;
        }
        Ok(done)
    }

    /// Copies the user memory at `ptr` into mirrored, writable pages `[first, npages)` of the
    /// range at `addr`, as [`Self::copy_to_user`] does the other way (straight only from a
    /// page-aligned buffer); a page whose lock is held elsewhere counts as not mirrored (it is
    /// faulted and retried).
    fn copy_from_user(
        &self,
        addr: usize,
        ptr: usize,
        first: usize,
        npages: usize,
        bounce: &mut Bounce,
    ) -> Result<usize> {
        // Straight from a page-aligned user buffer only: a user page that is not present then
        // fails the copy of a mirrored page before any of it is written.
        let direct = ptr % PAGE_SIZE == 0;
        let mut done = first;
        while done < npages {
            let mut input = user_pages(ptr, done, npages).reader();
            let mut not_present = false;
            if direct {
                done = self.walk_in(addr, done, npages, |_, guard, offset| {
                    not_present = guard
                        .copy_from_user_nofault(offset, PAGE_SIZE, &mut input)
                        .is_err();
                    !not_present
                });
            }
            if direct && !not_present {
                return Ok(done);
            }
            let end = (done + BOUNCE_PAGES).min(npages);
            let buf = bounce.get(end - done)?;
            user_pages(ptr, done, end).reader().read_slice(buf)?;
            let first = done;
            done = self.walk_in(addr, done, end, |i, guard, offset| {
                let at = (i - first) * PAGE_SIZE;
                guard.write(offset, &buf[at..at + PAGE_SIZE]).is_ok()
            });
            if done < end {
                return Ok(done);
            }
        }
        Ok(done)
    }

    /// Calls `f(i, guard, offset)` under the mirror lock for each live, writable mirrored page
    /// `i` of `[first, end)` of the range at `addr`, in order, with its folio locked and the
    /// page's offset in it, until a page is not mirrored (or its folio is locked elsewhere) or
    /// `f` returns false. Returns the index of the page it stopped at (`end` when it did not).
    /// `f` may run under a backing table's spinlock: it must not sleep.
    fn walk_in(
        &self,
        addr: usize,
        first: usize,
        end: usize,
        mut f: impl FnMut(usize, &mut FolioGuard<'_, WritableFolio>, usize) -> bool,
    ) -> usize {
        let mirror = self.mirror.lock();
        let mut tables = Tables::new(&self.device);
        let base = addr / PAGE_SIZE;
        for i in first..end {
            if (base + i) % LEAF_PAGES == 0 {
                tables.release();
            }
            let Some((folio, offset)) = mirror
                .get(base + i)
                .filter(|e| e.write && !e.atomic)
                .and_then(|entry| tables.find_writable(entry))
            else {
                return i;
            };
            let Some(mut guard) = folio.try_lock() else {
                return i;
            };
            if !f(i, &mut guard, offset) {
                return i;
            }
        }
        end
    }

    /// Runs `f(vma, start, next)` under the mmap read lock for each window of the range: at most
    /// one page table, within one VMA, which must exist and be readable (`EINVAL`).
    fn for_each_window(
        &self,
        mm: &MmWithUser,
        addr: usize,
        npages: usize,
        mut f: impl FnMut(&MmapReadGuard<'_>, usize, usize) -> Result,
    ) -> Result {
        let end = addr + npages * PAGE_SIZE;
        let mmap = mm.mmap_read_lock();
        let mut start = addr;
        while start < end {
            let vma = mmap.vma_lookup(start).ok_or(EINVAL)?;
            if vma.flags() & kernel::mm::virt::flags::READ == 0 {
                return Err(EINVAL);
            }
            // Windows end on PMD boundaries, so that huge pages migrate whole.
            let next = ((start / MIGRATE_WINDOW_SIZE + 1) * MIGRATE_WINDOW_SIZE)
                .min(end)
                .min(vma.end());
            f(&mmap, start, next)?;
            start = next;
        }
        Ok(())
    }

    /// Copies the mirror of the whole range to `cmd.ptr` without faulting: `ENOENT` if a page
    /// is not mirrored (it did not reach the device).
    fn read_back(&self, cmd: &mut Cmd) -> Result {
        let (addr, ptr, npages) = (cmd.addr as usize, cmd.ptr as usize, cmd.npages as usize);
        check_user_range(cmd)?;
        if self.copy_to_user(addr, ptr, 0, npages, &mut Bounce::new())? != npages {
            return Err(ENOENT);
        }
        cmd.cpages = cmd.npages;
        Ok(())
    }

    fn read(&self, cmd: &mut Cmd, unlocked: bool) -> Result {
        let (addr, ptr, npages) = (cmd.addr as usize, cmd.ptr as usize, cmd.npages as usize);
        let end = addr + npages * PAGE_SIZE;
        let mm = self.mm_user(EFAULT)?;
        check_user_range(cmd)?;
        let mut bounce = Bounce::new();
        let mut done = 0;
        loop {
            done = self.copy_to_user(addr, ptr, done, npages, &mut bounce)?;
            if done == npages {
                break;
            }
            // The rest of the range in one go, as the ABI counts faults.
            self.fault(&mm, addr + done * PAGE_SIZE, end, false, unlocked)?;
            cmd.faults += 1;
        }
        cmd.cpages = npages as u64;
        Ok(())
    }

    fn write(&self, cmd: &mut Cmd) -> Result {
        let (addr, ptr, npages) = (cmd.addr as usize, cmd.ptr as usize, cmd.npages as usize);
        let end = addr + npages * PAGE_SIZE;
        let mm = self.mm_user(EFAULT)?;
        check_user_range(cmd)?;
        let mut bounce = Bounce::new();
        let started = Instant::<Monotonic>::now();
        let mut done = 0;
        loop {
            let before = done;
            done = self.copy_from_user(addr, ptr, done, npages, &mut bounce)?;
            if done == npages {
                break;
            }
            if done == before && started.elapsed() > Delta::from_millis(FAULT_TIMEOUT_MS) {
                return Err(EBUSY);
            }
            self.fault(&mm, addr + done * PAGE_SIZE, end, true, false)?;
            cmd.faults += 1;
        }
        cmd.cpages = npages as u64;
        Ok(())
    }

    fn migrate_to_dev(&self, cmd: &mut Cmd) -> Result {
        let (addr, npages) = (cmd.addr as usize, cmd.npages as usize);
        let mm = self.mm_user(EINVAL)?;
        self.for_each_window(&mm, addr, npages, |mmap, start, next| {
            let _ioctl = IoctlMigration::new(&self.mirror);
            // The migration ignores its own invalidation: drop the entries of system pages,
            // which it replaces (their references would also make the pages look pinned), and
            // stale ones. Pages already in this device's memory stay, and stay mirrored.
            let mut tables = Tables::new(&self.device);
            self.mirror
                .lock()
                .remove(start / PAGE_SIZE, next / PAGE_SIZE, |e| match &e.data {
                    Data::Folio(folio, _) => !folio.is_zone_device(),
                    Data::Writable(folio, _) => !folio.is_zone_device(),
                    Data::Device(_) => tables.find(e).is_none(),
                });
            drop(tables);
            let mut mig = MigrateVma::setup(
                mmap,
                start,
                next,
                Some(&*self.device.owner),
                Select::SYSTEM | Select::COMPOUND,
            )?;
            let wanted =
                |i: usize| mig.src(i).is_migrate() && mig.src_folio(i).is_none_or(is_anon_system);
            let npages_wanted: usize = (0..mig.npages())
                .filter(|&i| wanted(i))
                .map(|i| mig.span(i))
                .sum();
            if npages_wanted == 0 {
                return Ok(());
            }
            let mut room = Room::new(start / PAGE_SIZE, next / PAGE_SIZE)?;
            let mut mapped = KVec::with_capacity(npages_wanted, GFP_KERNEL)?;
            // Out of device memory: migrate what was allocated, then report it.
            let res = self.to_device(&mut mig, &mut mapped);
            if res.is_err_and(|e| e != ENOMEM) {
                return res;
            }
            let mig = mig.pages();
            if self.device.is_coherent() {
                // A coherent page's entry holds a reference. A page unmapped between the
                // migration and here (`MADV_DONTNEED` on another thread; its invalidation found
                // no entry to drop) must not be mirrored, or the mirror would keep it in use,
                // unmapped, where no eviction can move it. So the entries come from the page
                // tables, under the notifier's sequence, as a fault's do, once the migration
                // is finalised (until then its pages are migration entries, not mapped).
                drop(mapped);
                drop(mig);
                self.mirror_device_pages(mmap, start, next, room)?;
                return res;
            }
            // A device-private entry names its page by generation and holds no reference: one
            // unmapped meanwhile reads as stale.
            let mut mirror = self.mirror.lock();
            for (i, entry) in mapped {
                if mig.migrated(i) {
                    // The room covers the window, so this does not fail.
                    mirror.insert(mig.addr(i) / PAGE_SIZE, entry, &mut room)?;
                }
            }
            res
        })?;
        // Every page of the range must now be in device memory and mirrored.
        self.read_back(cmd)
    }

    /// Mirrors the pages of `[start, end)` that are mapped to this device's memory, validated
    /// against the notifier's sequence; `EBUSY` if invalidations keep it from validating.
    fn mirror_device_pages(
        &self,
        mmap: &MmapReadGuard<'_>,
        start: usize,
        end: usize,
        mut room: Room,
    ) -> Result {
        let n = (end - start) / PAGE_SIZE;
        let owner = &self.device.owner;
        let ours = |e: &Entry| match &e.data {
            Data::Folio(folio, _) => DevPagemap::<Chunk>::of_folio(folio, owner).is_some(),
            Data::Writable(folio, _) => DevPagemap::<Chunk>::of_folio(folio, owner).is_some(),
            Data::Device(_) => false,
        };
        let started = Instant::<Monotonic>::now();
        loop {
            if started.elapsed() > Delta::from_millis(FAULT_TIMEOUT_MS) {
                return Err(EBUSY);
            }
            let seq = self.mirror.read_begin();
            let flags = FaultFlags::SNAPSHOT;
            let range =
                match HmmRange::fault(&self.mirror, mmap, seq, start, n, flags, Some(&**owner)) {
                    Err(e) if e == EBUSY => continue,
                    r => r?,
                };
            let mut entries = KVec::with_capacity(n, GFP_KERNEL)?;
            let Some(valid) = range.lock_if_valid() else {
                continue;
            };
            for i in 0..n {
                if let Some(entry) = self.mirror_entry(&range, i, &valid).filter(ours) {
                    entries
                        .push_within_capacity((i, entry))
                        .map_err(|_| ENOMEM)?;
                }
            }
            let mut mirror = valid;
            for (i, entry) in entries {
                // The room covers the window, so this does not fail.
                mirror.insert(start / PAGE_SIZE + i, entry, &mut room)?;
            }
            return Ok(());
        }
    }

    /// Gives every migratable system page of `mig` a device destination holding its data: a
    /// device folio of the source's order, or one page each when that fails (the device is
    /// out of large runs, a large backing folio cannot be had, or FAIL_ALLOC). Collects the
    /// mirror entries of the destinations in `mapped`, by migration entry.
    fn to_device(&self, mig: &mut MigrateVma<'_>, mapped: &mut KVec<(usize, Entry)>) -> Result {
        let mut device = self.device.allocator();
        let mut i = 0;
        while i < mig.npages() {
            let span = mig.span(i);
            let system = mig.src_folio(i).is_none_or(is_anon_system);
            if !mig.src(i).is_migrate() || !system {
                i += span;
                continue;
            }
            let fail = self.take_fail_alloc();
            if span > 1 && !fail {
                match device.alloc(PMD_ORDER, |f, s| Self::fill(mig, i, span, f, s, mapped)) {
                    Ok(()) => {
                        i += span;
                        continue;
                    }
                    Err(e) if e == ENOMEM => {}
                    Err(e) => return Err(e),
                }
            } else if fail && span == 1 {
                // The failed allocation leaves this page in system memory.
                i += span;
                continue;
            }
            for k in 0..span {
                device.alloc(0, |f, s| Self::fill(mig, i + k, 1, f, s, mapped))?;
            }
            i += span;
        }
        Ok(())
    }

    /// Fills the storage of `folio`, a new device folio of `n` pages, with the source data of
    /// entries `[i, i + n)`, records their mirror entries and gives it to entry `i`.
    fn fill(
        mig: &mut MigrateVma<'_>,
        i: usize,
        n: usize,
        mut folio: DeviceFolio<'_, Chunk>,
        storage: Storage<'_>,
        mapped: &mut KVec<(usize, Entry)>,
    ) -> Result {
        let write = mig.src(i).is_write();
        match storage {
            Storage::Backing(backing, page) => {
                copy_source(mig, i, n, backing)?;
                for k in 0..n {
                    let entry = Entry {
                        data: Data::Device(page.nth(k)),
                        write,
                        atomic: false,
                    };
                    mapped.push((i + k, entry), GFP_KERNEL)?;
                }
            }
            Storage::Direct => {
                copy_source(mig, i, n, &mut folio)?;
                for k in 0..n {
                    let entry = Entry {
                        data: Data::Writable(folio.cpu_ref().ok_or(EINVAL)?, k * PAGE_SIZE),
                        write,
                        atomic: false,
                    };
                    mapped.push((i + k, entry), GFP_KERNEL)?;
                }
            }
        }
        mig.set_dst(i, folio)
    }

    fn migrate_to_sys(&self, cmd: &mut Cmd) -> Result {
        let (addr, npages) = (cmd.addr as usize, cmd.npages as usize);
        let mm = self.mm_user(EINVAL)?;
        let mut migrated = 0;
        self.for_each_window(&mm, addr, npages, |mmap, start, next| {
            let _ioctl = IoctlMigration::new(&self.mirror);
            // The migration ignores its own invalidation. Entries of coherent pages hold
            // references, which would make the pages look pinned: they go, before and after
            // (what faults put there meanwhile). Entries of private pages that move go stale
            // (their generation tells) and are replaced on the next access or dropped by the
            // next invalidation of the range.
            let coherent = self.device.is_coherent();
            if coherent {
                self.mirror
                    .lock()
                    .remove(start / PAGE_SIZE, next / PAGE_SIZE, |_| true);
            }
            let mut mig = MigrateVma::setup(
                mmap,
                start,
                next,
                Some(&*self.device.owner),
                self.device.select() | Select::COMPOUND,
            )?;
            let given = to_system(&mut mig, &self.device.owner, || self.take_fail_alloc())?;
            let mig = mig.pages();
            if coherent {
                self.mirror
                    .lock()
                    .remove(start / PAGE_SIZE, next / PAGE_SIZE, |_| true);
            }
            let moved = (0..mig.npages()).filter(|&i| mig.migrated(i)).count();
            self.device
                .refused
                .fetch_add(given.saturating_sub(moved), Ordering::Relaxed);
            migrated += moved as u64;
            Ok(())
        })?;
        cmd.cpages = migrated;
        Ok(())
    }

    fn snapshot(&self, cmd: &mut Cmd) -> Result {
        let (addr, npages) = (cmd.addr as usize, cmd.npages as usize);
        let mm = self.mm_user(EINVAL)?;
        let mut out = UserSlice::new(UserPtr::from_addr(cmd.ptr as usize), npages).writer();
        let owner = Some(&*self.device.owner);
        let mut done = 0;
        while done < npages {
            let n = (npages - done).min(FAULT_WINDOW);
            let start = addr + done * PAGE_SIZE;
            let notifier = KBox::pin_init(
                MmuIntervalNotifier::new(&mm, start, n * PAGE_SIZE, Snapshot),
                GFP_KERNEL,
            )?;
            let started = Instant::<Monotonic>::now();
            let mut bytes = [0u8; FAULT_WINDOW];
            loop {
                if started.elapsed() > Delta::from_millis(FAULT_TIMEOUT_MS) {
                    return Err(EBUSY);
                }
                let seq = notifier.read_begin();
                let range = {
                    let mmap = mm.mmap_read_lock();
                    HmmRange::fault(&notifier, &mmap, seq, start, n, FaultFlags::SNAPSHOT, owner)
                };
                let range = match range {
                    Err(e) if e == EBUSY => continue,
                    r => r?,
                };
                let Some(valid) = range.lock_if_valid() else {
                    continue;
                };
                for (i, pfn) in range.pfns().iter().enumerate() {
                    bytes[i] = if pfn.is_error() {
                        prot::ERROR
                    } else if !pfn.is_valid() {
                        prot::NONE
                    } else {
                        let mut b = match range.folio(i, &valid) {
                            Some(f) if f.is_device_private() => {
                                if DevPagemap::<Chunk>::of_folio(&f, &self.device.owner).is_some() {
                                    prot::DEV_PRIVATE_LOCAL
                                } else {
                                    prot::DEV_PRIVATE_REMOTE
                                }
                            }
                            Some(f) if f.is_device_coherent() => {
                                if DevPagemap::<Chunk>::of_folio(&f, &self.device.owner).is_some() {
                                    prot::DEV_COHERENT_LOCAL
                                } else {
                                    prot::DEV_COHERENT_REMOTE
                                }
                            }
                            _ if pfn.is_zero_page() => prot::ZERO,
                            _ => 0,
                        };
                        b |= if pfn.is_writable() {
                            prot::WRITE
                        } else {
                            prot::READ
                        };
                        if pfn.map_order() == PMD_ORDER {
                            b |= prot::PMD;
                        }
                        b
                    };
                }
                break;
            }
            drop(notifier);
            out.write_slice(&bytes[..n])?;
            cmd.cpages += n as u64;
            done += n;
        }
        Ok(())
    }

    fn exclusive(&self, cmd: &mut Cmd) -> Result {
        let (addr, npages) = (cmd.addr as usize, cmd.npages as usize);
        let mm = self.mm_user(EINVAL)?;
        {
            let mmap = mm.mmap_read_lock();
            for i in 0..npages {
                self.exclusive_page(&mmap, addr + i * PAGE_SIZE)?;
            }
        }
        self.read_back(cmd)
    }

    /// Takes exclusive access to the page at `addr` and mirrors it as such.
    ///
    /// The entry must not outlive the exclusive mapping: a page unmapped (`MADV_DONTNEED` on
    /// another thread) after exclusive access is taken, but before the entry is in, would stay
    /// mirrored and referenced. So the entry goes in under the notifier's sequence read before
    /// taking exclusive access, which that does not move (`own_exclusive`), and the folio stays
    /// locked until it is in: a CPU access that ends the exclusive access waits for the lock,
    /// and its invalidation then removes the entry.
    fn exclusive_page(&self, mmap: &MmapReadGuard<'_>, addr: usize) -> Result {
        let page = addr / PAGE_SIZE;
        let mut room = Room::new(page, page + 1)?;
        let owner = &self.device.owner;
        let started = Instant::<Monotonic>::now();
        let mut prepared = false;
        loop {
            if started.elapsed() > Delta::from_millis(FAULT_TIMEOUT_MS) {
                return Err(EBUSY);
            }
            if prepared {
                // The last try invalidated the page on its way (a copy-on-write break, a huge
                // page split, or undoing an exclusive access taken before): do that part first.
                let seq = self.mirror.read_begin();
                let flags = FaultFlags::WRITE;
                match HmmRange::fault(&self.mirror, mmap, seq, addr, 1, flags, Some(&**owner)) {
                    Err(e) if e == EBUSY => continue,
                    r => drop(r?),
                }
            }
            let seq = self.mirror.read_begin();
            let exclusive = make_device_exclusive(mmap, addr, Some(&**owner))?;
            let Some(mut mirror) = self.mirror.lock_if_valid(seq) else {
                prepared = true;
                continue;
            };
            let entry = Entry {
                data: Data::Folio(exclusive.folio().clone(), exclusive.offset()),
                write: true,
                atomic: true,
            };
            mirror.insert(page, entry, &mut room)?;
            drop(mirror);
            drop(exclusive);
            return Ok(());
        }
    }

    fn check_exclusive(&self, cmd: &mut Cmd) -> Result {
        let first = cmd.addr as usize / PAGE_SIZE;
        let end = first + cmd.npages as usize;
        // The leaves that exist in the range, not every page of it: `npages` may be huge.
        if self.mirror.lock().any(first, end, |e| e.atomic) {
            return Err(EPERM);
        }
        Ok(())
    }
}

#[vtable]
impl MiscDevice for DmirrorFile {
    type Ptr = Pin<KBox<Self>>;
    type RegistrationData = Arc<Device>;

    fn open(_file: &File, misc: &MiscDeviceRegistration<Self>) -> Result<Pin<KBox<Self>>> {
        let device = misc.data().clone();
        let task = kernel::current!();
        let user_mm = task.mm().ok_or(EINVAL)?;
        let mm_ref: ARef<Mm> = ARef::from(&**user_mm);
        let table = Mirror {
            table: RBTree::new(),
            owner: device.owner.clone(),
            ioctl_migrations: 0,
        };
        let this = KBox::pin_init(
            try_pin_init!(Self {
                device,
                mm: mm_ref,
                flags: AtomicU64::new(0),
                mirror <- MmuIntervalNotifier::new(user_mm, 0, usize::MAX & !(PAGE_SIZE - 1), table),
            }),
            GFP_KERNEL,
        )?;
        this.device.open();
        Ok(this)
    }

    fn release(this: Pin<KBox<Self>>, _file: &File) {
        let device = this.device.clone();
        drop(this);
        device.close();
    }

    /// Maps zeroed system pages: a VM_MIXEDMAP area the selftest snapshots.
    fn mmap(_this: Pin<&Self>, _file: &File, vma: &VmaNew) -> Result {
        let mixed = vma.set_mixedmap();
        let mut addr = mixed.start();
        while addr < mixed.end() {
            let page = Page::alloc_page(GFP_KERNEL | __GFP_ZERO)?;
            // The page table takes its own reference; ours goes with `page`.
            mixed.vm_insert_page(addr, &page)?;
            addr += PAGE_SIZE;
        }
        Ok(())
    }

    fn ioctl(this: Pin<&Self>, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        match cmd {
            uapi::READ
            | uapi::WRITE
            | uapi::MIGRATE_TO_DEV
            | uapi::MIGRATE_TO_SYS
            | uapi::SNAPSHOT
            | uapi::EXCLUSIVE
            | uapi::CHECK_EXCLUSIVE
            | uapi::RELEASE
            | uapi::FLAGS
            | uapi::READ_UNLOCKED => {}
            _ => return Err(ENOTTY),
        }
        let (mut reader, mut writer) =
            UserSlice::new(UserPtr::from_addr(arg), core::mem::size_of::<Cmd>()).reader_writer();
        let mut c = Cmd {
            addr: reader.read()?,
            ptr: reader.read()?,
            npages: reader.read()?,
            cpages: 0,
            faults: 0,
        };
        let _: u64 = reader.read()?;
        let _: u64 = reader.read()?;
        // Page-aligned, non-empty, no wrap-around: checked for every command, as the ABI does.
        let len = c.npages.checked_mul(PAGE_SIZE as u64).ok_or(EINVAL)?;
        if c.addr % PAGE_SIZE as u64 != 0
            || c.npages == 0
            || c.addr
                .checked_add(len)
                .is_none_or(|e| e > usize::MAX as u64)
        {
            return Err(EINVAL);
        }
        match cmd {
            uapi::READ => this.read(&mut c, false)?,
            uapi::READ_UNLOCKED => this.read(&mut c, true)?,
            uapi::WRITE => this.write(&mut c)?,
            uapi::MIGRATE_TO_DEV => this.migrate_to_dev(&mut c)?,
            uapi::MIGRATE_TO_SYS => this.migrate_to_sys(&mut c)?,
            uapi::SNAPSHOT => this.snapshot(&mut c)?,
            uapi::EXCLUSIVE => this.exclusive(&mut c)?,
            uapi::CHECK_EXCLUSIVE => this.check_exclusive(&mut c)?,
            uapi::RELEASE => this.device.release()?,
            uapi::FLAGS => this.flags.store(c.npages, Ordering::Relaxed),
            _ => return Err(EOPNOTSUPP),
        }
        for v in [c.addr, c.ptr, c.npages, c.cpages, c.faults] {
            writer.write(&v)?;
        }
        Ok(0)
    }
}
