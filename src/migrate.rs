// SPDX-License-Identifier: GPL-2.0

//! MIGRATE_TO_DEV and MIGRATE_TO_SYS: migrations of a range between system memory and this
//! device's memory, a page table at a time, and the mirror entries of the pages they move.
//!
//! The device side of the way back, shared with CPU faults on device pages, is
//! [`to_system`] in `device.rs`.

use crate::{
    device::{to_system, Chunk, Storage, TableLock},
    file::DmirrorFile,
    mirror::{check_signal, Entry, IoctlMigration, NewEntry, Room, FAULT_TIMEOUT_MS},
    uapi::Cmd,
};
use core::sync::atomic::Ordering;
use kernel::{
    alloc::flags::GFP_KERNEL,
    mm::{
        folio::{CpuFolio, Folio, LockedFolio},
        hmm::{FaultFlags, HmmRange},
        memremap::{DevPagemap, DeviceFolio, PMD_ORDER},
        migrate::{MigrateVma, SelectFlag, COMPOUND_PAGES},
        MmWithUser, MmapReadGuard,
    },
    page::PAGE_SIZE,
    prelude::*,
    time::{Delta, Instant, Monotonic},
};

/// Bytes migrated per `migrate_vma` call: one page table, PMD-aligned.
const MIGRATE_WINDOW_SIZE: usize = COMPOUND_PAGES * PAGE_SIZE;

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
            check_signal()?;
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

    /// MIGRATE_TO_DEV: migrates the anonymous system pages of the range to device memory and
    /// mirrors them, then reads the whole range back to `cmd.ptr` (`ENOENT` if a page is not
    /// in the mirror).
    pub(crate) fn migrate_to_dev(&self, cmd: &mut Cmd) -> Result {
        let (addr, npages) = (cmd.addr as usize, cmd.npages as usize);
        let mm = self.mm_user(EINVAL)?;
        self.for_each_window(&mm, addr, npages, |mmap, start, next| {
            let _ioctl = IoctlMigration::new(&self.mirror);
            // The migration ignores its own invalidation: drop the entries of system pages,
            // which it replaces (their references would also make the pages look pinned), and
            // stale ones. Pages already in this device's memory stay, and stay mirrored.
            let mut tables = TableLock::new();
            self.mirror
                .lock()
                .remove(start / PAGE_SIZE, next / PAGE_SIZE, |e| match e {
                    Entry::Folio { folio, .. } => !folio.is_zone_device(),
                    Entry::Device(page, _) => tables.backing(&self.device, &page).is_none(),
                });
            drop(tables);
            let mut mig = MigrateVma::setup(
                mmap,
                start,
                next,
                Some(&*self.device.owner),
                SelectFlag::System | SelectFlag::Compound,
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
            // Device-private destinations only: coherent ones are mirrored from the page tables.
            let coherent = self.device.is_coherent();
            let wanted_entries = if coherent { 0 } else { npages_wanted };
            let mut mapped = KVec::with_capacity(wanted_entries, GFP_KERNEL)?;
            // Out of device memory: migrate what was allocated, then report it.
            let res = self.to_device(&mut mig, &mut mapped);
            if res.is_err_and(|e| e != ENOMEM) {
                return res;
            }
            let mig = mig.pages();
            if coherent {
                // A coherent page's entry holds a reference. A page unmapped between the
                // migration and here (`MADV_DONTNEED` on another thread; its invalidation found
                // no entry to drop) must not be mirrored, or the mirror would keep it in use,
                // unmapped, where no eviction can move it. So the entries come from the page
                // tables, under the notifier's sequence, as a fault's do, once the migration
                // is finalised (until then its pages are migration entries, not mapped).
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
        let ours = |e: &NewEntry| match e {
            NewEntry::Folio(folio, _) | NewEntry::Exclusive(folio, _) => {
                DevPagemap::<Chunk>::of_folio(folio, owner).is_some()
            }
            NewEntry::Writable(grant) => DevPagemap::<Chunk>::of_folio(grant, owner).is_some(),
            NewEntry::Device(..) => false,
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
    fn to_device(&self, mig: &mut MigrateVma<'_>, mapped: &mut KVec<(usize, NewEntry)>) -> Result {
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
    /// entries `[i, i + n)`, records their mirror entries (device-private memory; coherent
    /// pages are mirrored from the page tables once the migration is done, see
    /// [`Self::migrate_to_dev`]) and gives it to entry `i`.
    fn fill(
        mig: &mut MigrateVma<'_>,
        i: usize,
        n: usize,
        mut folio: DeviceFolio<'_, Chunk>,
        storage: Storage<'_>,
        mapped: &mut KVec<(usize, NewEntry)>,
    ) -> Result {
        let write = mig.src(i).is_write();
        match storage {
            Storage::Backing(backing, page) => {
                copy_source(mig, i, n, backing)?;
                for k in 0..n {
                    let entry = NewEntry::Device(page.nth(k), write);
                    mapped.push((i + k, entry), GFP_KERNEL)?;
                }
            }
            Storage::Direct => copy_source(mig, i, n, &mut folio)?,
        }
        mig.set_dst(i, folio)
    }

    /// MIGRATE_TO_SYS: migrates this device's pages in the range back to system memory;
    /// `cmd.cpages` counts those that moved.
    pub(crate) fn migrate_to_sys(&self, cmd: &mut Cmd) -> Result {
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
                self.device.select() | SelectFlag::Compound,
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
}
