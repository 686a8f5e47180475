// SPDX-License-Identifier: GPL-2.0

//! READ, WRITE and READ_UNLOCKED: copies between mirrored pages and user memory.
//!
//! Each page is copied once, straight between the mirrored folio and user memory, under the
//! mirror lock with page faults disabled. A user page that is not present sends that window
//! through a bounce buffer outside the lock, which faults it in. Writes go straight only from a
//! page-aligned buffer, so a failed copy never leaves part of a page written. Pages that are not
//! mirrored are faulted into the mirror and the copy goes on.

use crate::{
    device::{TableLock, COPY_RUN},
    file::DmirrorFile,
    mirror::{entry, find_writable, Leaf, FAULT_TIMEOUT_MS, FAULT_WINDOW, LEAF_PAGES},
    uapi::Cmd,
};
use kernel::{
    alloc::flags::GFP_KERNEL,
    mm::{
        folio::CpuFolio,
        hmm::{ValidGuard, WritablePageGuard},
    },
    page::PAGE_SIZE,
    prelude::*,
    time::{Delta, Instant, Monotonic},
    uaccess::{UserPtr, UserSlice},
};

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

impl DmirrorFile {
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
        let base = addr / PAGE_SIZE;
        let mut i = first;
        while i < end {
            // The mirror's lock is held for one leaf's pages at a time, so that an invalidation
            // (another thread's migration, say) waits for one leaf's copies, not the range's.
            let mirror = self.mirror.lock();
            let key = (base + i) / LEAF_PAGES;
            let stop = ((key + 1) * LEAF_PAGES - base).min(end);
            let leaf = mirror.leaf(key);
            // A table's lock is held for `COPY_RUN` pages at most.
            let mut tables = TableLock::with_run(COPY_RUN);
            for j in i..stop {
                let Some((folio, offset)) = leaf
                    .and_then(|l| entry(l, (base + j) % LEAF_PAGES))
                    .and_then(|e| e.find(&self.device, &mut tables))
                else {
                    return Ok(j);
                };
                if !f(j, folio, offset)? {
                    return Ok(j);
                }
            }
            i = stop;
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
                done = self.walk_in(addr, done, npages, |_, page| {
                    not_present = page
                        .copy_from_user_nofault(0, PAGE_SIZE, &mut input)
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
            done = self.walk_in(addr, done, end, |i, page| {
                let at = (i - first) * PAGE_SIZE;
                page.write(0, &buf[at..at + PAGE_SIZE]).is_ok()
            });
            if done < end {
                return Ok(done);
            }
        }
        Ok(done)
    }

    /// Calls `f(i, page)` under the mirror lock for each live, writable mirrored page `i` of
    /// `[first, end)` of the range at `addr`, in order, with its folio locked, until a page is
    /// not mirrored (or its folio is locked elsewhere, or its write grant is older than the last
    /// invalidation) or `f` returns false. Returns the index of the page it stopped at (`end`
    /// when it did not). `f` may run under a backing table's spinlock: it must not sleep.
    fn walk_in(
        &self,
        addr: usize,
        first: usize,
        end: usize,
        mut f: impl FnMut(usize, &mut WritablePageGuard<'_>) -> bool,
    ) -> usize {
        // The mirror's lock, checked for the current sequence number: the grants found under it
        // write (`read_begin()` waits for an invalidation in progress).
        let mirror = loop {
            if let Some(valid) = ValidGuard::new(&self.mirror, self.mirror.read_begin()) {
                break valid;
            }
        };
        // A table's lock is held for `COPY_RUN` pages at most.
        let mut tables = TableLock::with_run(COPY_RUN);
        let base = addr / PAGE_SIZE;
        // The current leaf, looked up once.
        let mut leaf: Option<(usize, &Leaf)> = None;
        for i in first..end {
            let (key, slot) = ((base + i) / LEAF_PAGES, (base + i) % LEAF_PAGES);
            if leaf.is_none_or(|(k, _)| k != key) {
                leaf = mirror.leaf(key).map(|l| (key, l));
            }
            let device = &self.device;
            let Some(mut page) =
                leaf.and_then(|(_, l)| find_writable(l, slot, device, &mut tables, &mirror))
            else {
                return i;
            };
            if !f(i, &mut page) {
                return i;
            }
        }
        end
    }

    /// Copies the mirror of the whole range to `cmd.ptr` without faulting: `ENOENT` if a page
    /// is not mirrored (it did not reach the device).
    pub(crate) fn read_back(&self, cmd: &mut Cmd) -> Result {
        let (addr, ptr, npages) = (cmd.addr as usize, cmd.ptr as usize, cmd.npages as usize);
        check_user_range(cmd)?;
        if self.copy_to_user(addr, ptr, 0, npages, &mut Bounce::new())? != npages {
            return Err(ENOENT);
        }
        cmd.cpages = cmd.npages;
        Ok(())
    }

    /// READ, and READ_UNLOCKED with `unlocked`: copies the mirror of the range to `cmd.ptr`,
    /// faulting in what is not mirrored; `cmd.faults` counts the fault rounds.
    pub(crate) fn read(&self, cmd: &mut Cmd, unlocked: bool) -> Result {
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

    /// WRITE: copies `cmd.ptr` into the mirror of the range, faulting it in writable as needed;
    /// `cmd.faults` counts the fault rounds.
    ///
    /// A write grant lasts until the next invalidation anywhere in the mirror, and faulting a
    /// window in can invalidate (breaking copy-on-write does): so the range is faulted a window
    /// at a time and each window copied before the next is faulted. A round is one pass over
    /// the range; the next starts when the copy stops at a page this call faulted already.
    pub(crate) fn write(&self, cmd: &mut Cmd) -> Result {
        let (addr, ptr, npages) = (cmd.addr as usize, cmd.ptr as usize, cmd.npages as usize);
        let mm = self.mm_user(EFAULT)?;
        check_user_range(cmd)?;
        let mut bounce = Bounce::new();
        let started = Instant::<Monotonic>::now();
        let mut done = 0;
        // The pages faulted by this call end here (0: none yet).
        let mut faulted = 0;
        loop {
            let before = done;
            done = self.copy_from_user(addr, ptr, done, npages, &mut bounce)?;
            if done == npages {
                break;
            }
            if done == before && started.elapsed() > Delta::from_millis(FAULT_TIMEOUT_MS) {
                return Err(EBUSY);
            }
            if faulted == 0 || done < faulted {
                cmd.faults += 1;
            }
            faulted = (done + FAULT_WINDOW).min(npages);
            self.fault(
                &mm,
                addr + done * PAGE_SIZE,
                addr + faulted * PAGE_SIZE,
                true,
                false,
            )?;
        }
        cmd.cpages = npages as u64;
        Ok(())
    }
}
