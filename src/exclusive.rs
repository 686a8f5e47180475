// SPDX-License-Identifier: GPL-2.0

//! EXCLUSIVE and CHECK_EXCLUSIVE: device-exclusive (atomic) access to pages, mirrored as such.

use crate::{
    file::DmirrorFile,
    mirror::{Entry, NewEntry, Room, FAULT_TIMEOUT_MS},
    uapi::Cmd,
};
use kernel::{
    mm::{
        hmm::{make_device_exclusive, FaultFlags, HmmRange},
        MmapReadGuard,
    },
    page::PAGE_SIZE,
    prelude::*,
    time::{Delta, Instant, Monotonic},
};

impl DmirrorFile {
    /// EXCLUSIVE: takes device-exclusive access to each page of the range and mirrors it as
    /// such, then reads the range back to `cmd.ptr`.
    pub(crate) fn exclusive(&self, cmd: &mut Cmd) -> Result {
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
            let entry = NewEntry::Exclusive(exclusive.folio().clone(), exclusive.offset());
            mirror.insert(page, entry, &mut room)?;
            drop(mirror);
            drop(exclusive);
            return Ok(());
        }
    }

    /// CHECK_EXCLUSIVE: `EPERM` if a page of the range is mirrored device-exclusive.
    pub(crate) fn check_exclusive(&self, cmd: &mut Cmd) -> Result {
        let first = cmd.addr as usize / PAGE_SIZE;
        let end = first + cmd.npages as usize;
        // The leaves that exist in the range, not every page of it: `npages` may be huge.
        if self.mirror.lock().any(first, end, |e| {
            matches!(
                e,
                Entry::Folio {
                    exclusive: true,
                    ..
                }
            )
        }) {
            return Err(EPERM);
        }
        Ok(())
    }
}
