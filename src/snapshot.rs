// SPDX-License-Identifier: GPL-2.0

//! SNAPSHOT: one byte per page saying how the CPU maps it, from an HMM snapshot under a
//! notifier of its own, without touching the mirror.

use crate::{
    device::Chunk,
    file::DmirrorFile,
    mirror::{check_signal, FAULT_TIMEOUT_MS, FAULT_WINDOW},
    uapi::{prot, Cmd},
};
use kernel::{
    alloc::flags::GFP_KERNEL,
    mm::{
        hmm::{FaultFlags, HmmRange},
        memremap::{DevPagemap, PMD_ORDER},
        mmu_notifier::{MmuIntervalNotifier, MmuIntervalNotifierOps, NotifierRange},
    },
    page::PAGE_SIZE,
    prelude::*,
    time::{Delta, Instant, Monotonic},
    uaccess::{UserPtr, UserSlice},
};

/// A temporary notifier's state for SNAPSHOT: nothing to tear down.
struct Snapshot;

impl MmuIntervalNotifierOps for Snapshot {
    fn invalidate(_state: &mut Self, _range: &NotifierRange<'_>) {}
}

impl DmirrorFile {
    /// SNAPSHOT: writes one [`prot`] byte per page of the range to `cmd.ptr`, saying how the
    /// CPU maps it.
    pub(crate) fn snapshot(&self, cmd: &mut Cmd) -> Result {
        let (addr, npages) = (cmd.addr as usize, cmd.npages as usize);
        let mm = self.mm_user(EINVAL)?;
        let mut out = UserSlice::new(UserPtr::from_addr(cmd.ptr as usize), npages).writer();
        let owner = Some(&*self.device.owner);
        let mut done = 0;
        while done < npages {
            check_signal()?;
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
}
