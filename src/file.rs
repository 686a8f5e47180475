// SPDX-License-Identifier: GPL-2.0

//! An open `/dev/hmm_dmirrorN`, and its ioctls (`lib/test_hmm_uapi.h`): each command's own
//! module serves it on the file's mirror of the opener's address space.

use crate::{
    device::Device,
    mirror::Mirror,
    uapi::{self, Cmd},
};
use core::sync::atomic::{AtomicU64, Ordering};
use kernel::{
    alloc::flags::{__GFP_ZERO, GFP_KERNEL},
    fs::File,
    miscdevice::{MiscDevice, MiscDeviceRegistration},
    mm::{mmu_notifier::MmuIntervalNotifier, virt::VmaNew, Mm, MmWithUser},
    page::{Page, PAGE_SIZE},
    prelude::*,
    sync::{aref::ARef, Arc},
    uaccess::{UserPtr, UserSlice},
};

/// An open device file.
#[pin_data]
pub(crate) struct DmirrorFile {
    pub(crate) device: Arc<Device>,
    mm: ARef<Mm>,
    flags: AtomicU64,
    #[pin]
    pub(crate) mirror: MmuIntervalNotifier<Mirror>,
}

impl DmirrorFile {
    /// Returns the opener's address space, if it still has users; `gone` if not.
    pub(crate) fn mm_user(&self, gone: Error) -> Result<ARef<MmWithUser>> {
        self.mm.mmget_not_zero().ok_or(gone)
    }

    /// Takes the one-shot FAIL_ALLOC flag: true if the next allocation must fail.
    pub(crate) fn take_fail_alloc(&self) -> bool {
        // A load first: the flag is almost never set, and this runs for every page.
        self.flags.load(Ordering::Relaxed) & uapi::FLAG_FAIL_ALLOC != 0
            && self
                .flags
                .fetch_and(!uapi::FLAG_FAIL_ALLOC, Ordering::Relaxed)
                & uapi::FLAG_FAIL_ALLOC
                != 0
    }

    /// Sets the file's flags from `cmd.npages` (FLAGS).
    fn set_flags(&self, cmd: &Cmd) -> Result {
        self.flags.store(cmd.npages, Ordering::Relaxed);
        Ok(())
    }
}

/// Runs a command on the command block at `arg`: reads the block, checks its range, runs `f`
/// on it and writes it back with what `f` filled in.
fn command(arg: usize, f: impl FnOnce(&mut Cmd) -> Result) -> Result<isize> {
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
    f(&mut c)?;
    for v in [c.addr, c.ptr, c.npages, c.cpages, c.faults] {
        writer.write(&v)?;
    }
    Ok(0)
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
        let table = Mirror::new(device.owner.clone());
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
            uapi::READ => command(arg, |c| this.read(c, false)),
            uapi::READ_UNLOCKED => command(arg, |c| this.read(c, true)),
            uapi::WRITE => command(arg, |c| this.write(c)),
            uapi::MIGRATE_TO_DEV => command(arg, |c| this.migrate_to_dev(c)),
            uapi::MIGRATE_TO_SYS => command(arg, |c| this.migrate_to_sys(c)),
            uapi::SNAPSHOT => command(arg, |c| this.snapshot(c)),
            uapi::EXCLUSIVE => command(arg, |c| this.exclusive(c)),
            uapi::CHECK_EXCLUSIVE => command(arg, |c| this.check_exclusive(c)),
            uapi::RELEASE => command(arg, |_| this.device.release(true)),
            uapi::FLAGS => command(arg, |c| this.set_flags(c)),
            _ => Err(ENOTTY),
        }
    }
}
