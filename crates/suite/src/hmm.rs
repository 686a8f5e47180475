//! The device node and its commands, anonymous buffers, and data patterns. The ioctl ABI
//! itself (`lib/test_hmm_uapi.h`) is in [`dmirror_abi::uapi`].

use crate::ensure;
use crate::harness::{Fail, R};
use dmirror_abi::uapi::{
    Cmd, FLAGS, FLAG_FAIL_ALLOC, MIGRATE_TO_DEV, MIGRATE_TO_SYS, PAGE, PROT_DEV_COHERENT_LOCAL,
    PROT_DEV_PRIVATE_LOCAL, READ, RELEASE, SNAPSHOT, WRITE,
};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Pages in a PMD-sized huge page.
pub const THP_PAGES: usize = 512;
pub const THP: usize = PAGE * THP_PAGES;

/// An open device node.
pub struct Dev {
    fd: OwnedFd,
}

impl Dev {
    pub fn open(path: &str) -> R<Dev> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Fail::Fail(format!("open {path}: {e}")))?;
        Ok(Dev { fd: f.into() })
    }

    /// Issues `req` on `[addr, addr + npages pages)` with `ptr`; returns the command block.
    pub fn cmd(&self, req: u64, addr: usize, ptr: usize, npages: usize) -> io::Result<Cmd> {
        let mut c = Cmd {
            addr: addr as u64,
            ptr: ptr as u64,
            npages: npages as u64,
            ..Cmd::default()
        };
        // The driver reads and writes only `c` and the user memory it names.
        // SAFETY: `c` is a valid `struct hmm_dmirror_cmd` for the duration of the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, &mut c) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(c)
        }
    }

    /// Issues `req` with the command block at `arg`, which may be any address.
    ///
    /// # Safety
    ///
    /// `arg` must be an address the kernel cannot access, or the first of 40 bytes that the
    /// caller lets the kernel read and write.
    pub unsafe fn ioctl_at(&self, req: u64, arg: usize) -> io::Result<()> {
        // SAFETY: The caller vouches for `arg`; the driver refuses what it cannot access.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut libc::c_void) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The descriptor, to map the device.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Migrates the pages to the device; returns how many moved (`cpages`). The driver
    /// copies the migrated data out to a buffer, as the ABI wants.
    pub fn to_dev(&self, addr: usize, npages: usize) -> io::Result<u64> {
        let mut buf = vec![0u8; npages * PAGE];
        self.cmd(MIGRATE_TO_DEV, addr, buf.as_mut_ptr() as usize, npages)
            .map(|c| c.cpages)
    }

    /// Migrates this device's pages back to system memory; returns `cpages`.
    pub fn to_sys(&self, addr: usize, npages: usize) -> io::Result<u64> {
        self.cmd(MIGRATE_TO_SYS, addr, 0, npages).map(|c| c.cpages)
    }

    /// Reads the pages through the device's mirror.
    pub fn read(&self, addr: usize, npages: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; npages * PAGE];
        self.cmd(READ, addr, buf.as_mut_ptr() as usize, npages)?;
        Ok(buf)
    }

    /// Writes the pages through the device's mirror.
    pub fn write(&self, addr: usize, data: &[u8]) -> io::Result<()> {
        self.cmd(WRITE, addr, data.as_ptr() as usize, data.len() / PAGE)
            .map(|_| ())
    }

    /// One SNAPSHOT byte per page.
    pub fn snapshot(&self, addr: usize, npages: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; npages];
        self.cmd(SNAPSHOT, addr, buf.as_mut_ptr() as usize, npages)?;
        Ok(buf)
    }

    /// Evicts all device memory (the range must be a valid one, though it is not used).
    pub fn release(&self, addr: usize, npages: usize) -> io::Result<()> {
        self.cmd(RELEASE, addr, 0, npages).map(|_| ())
    }

    /// Makes the next device memory allocation fail.
    pub fn fail_next_alloc(&self) -> io::Result<()> {
        self.cmd(FLAGS, 0, 0, FLAG_FAIL_ALLOC as usize).map(|_| ())
    }
}

/// An anonymous private mapping, unmapped on drop (unless `forget`).
pub struct Map {
    pub addr: usize,
    pub len: usize,
}

impl Map {
    /// Maps `len` bytes read-write.
    pub fn anon(len: usize) -> R<Map> {
        Self::anon_aligned(len, PAGE, false)
    }

    /// Maps `len` bytes aligned to a huge page, with `MADV_HUGEPAGE` so the first touch of
    /// each aligned 2 MiB gets a THP.
    pub fn thp(len: usize) -> R<Map> {
        Self::anon_aligned(len, THP, true)
    }

    fn anon_aligned(len: usize, align: usize, huge: bool) -> R<Map> {
        let total = len + align;
        // SAFETY: A fresh anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        let base = p as usize;
        let addr = base.next_multiple_of(align);
        // SAFETY: Trims the parts of our own mapping outside `[addr, addr + len)`.
        unsafe {
            if addr > base {
                libc::munmap(base as *mut _, addr - base);
            }
            let end = addr + len;
            if base + total > end {
                libc::munmap(end as *mut _, base + total - end);
            }
            if huge {
                libc::madvise(addr as *mut _, len, libc::MADV_HUGEPAGE);
            }
        }
        Ok(Map { addr, len })
    }

    pub fn npages(&self) -> usize {
        self.len / PAGE
    }

    /// The mapping's bytes.
    ///
    /// Handed out from `&self` on purpose: the mapping is memory the kernel migrates and
    /// writes behind the program's back, and the cases share it with threads and forked
    /// children; each case uses one view at a time.
    #[allow(clippy::mut_from_ref)]
    pub fn bytes(&self) -> &mut [u8] {
        // Device pages are migrated back on access by the kernel, so plain accesses are valid;
        // cases that change the mapping's protection do not call this meanwhile.
        // SAFETY: The mapping is ours, readable and writable while `self` lives.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }

    /// Page `i`'s address.
    pub fn page(&self, i: usize) -> usize {
        self.addr + i * PAGE
    }

    /// Leaves the mapping in place (the test unmapped or moved it itself).
    pub fn forget(self) {
        std::mem::forget(self)
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: Unmaps our own mapping.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

/// A small seeded generator (xorshift64*), so that failures replay with the same seed.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next value; not an `Iterator`, the sequence never ends.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Fills `buf` with the pattern of `seed`.
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut r = Rng::new(seed);
    for c in buf.chunks_mut(8) {
        let v = r.next().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

/// Checks `buf` against the pattern of `seed`; the error names the first differing byte.
pub fn verify(buf: &[u8], seed: u64, what: &str) -> R {
    let mut r = Rng::new(seed);
    for (i, c) in buf.chunks(8).enumerate() {
        let v = r.next().to_le_bytes();
        if c != &v[..c.len()] {
            let at = i * 8 + c.iter().zip(v.iter()).position(|(a, b)| a != b).unwrap_or(0);
            return Err(Fail::Fail(format!(
                "{what}: byte {at} (page {}) differs from the pattern",
                at / PAGE
            )));
        }
    }
    Ok(())
}

/// Checks that `buf` is all zeroes.
pub fn verify_zero(buf: &[u8], what: &str) -> R {
    match buf.iter().position(|&b| b != 0) {
        None => Ok(()),
        Some(at) => Err(Fail::Fail(format!(
            "{what}: byte {at} (page {}) is not zero",
            at / PAGE
        ))),
    }
}

/// The SNAPSHOT value of a page in the memory of a device of this kind.
pub fn local_prot(coherent: bool) -> u8 {
    if coherent {
        PROT_DEV_COHERENT_LOCAL
    } else {
        PROT_DEV_PRIVATE_LOCAL
    }
}

/// A pipe, both ends closed on drop.
pub struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
}

impl Pipe {
    pub fn new() -> R<Pipe> {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` has room for the two descriptors `pipe2` writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `pipe2` succeeded: both descriptors are open and owned by nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { rd, wr })
    }

    /// Splices the user pages at `addr` into the pipe: the pipe takes a reference on each
    /// page (`get_user_pages`, no pin) and keeps it until the data is read.
    pub fn vmsplice(&self, addr: usize, len: usize) -> R<usize> {
        let iov = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: `iov` describes mapped memory of this process; the kernel only reads it.
        let n = unsafe { libc::vmsplice(self.wr.as_raw_fd(), &iov, 1, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(n as usize)
    }

    /// Writes one byte, for whoever waits in [`Pipe::read`].
    pub fn signal(&self) -> R {
        // SAFETY: Writes one byte from a static buffer.
        let n = unsafe { libc::write(self.wr.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        ensure!(n == 1, "pipe write: {}", std::io::Error::last_os_error());
        Ok(())
    }

    pub fn read(&self, len: usize) -> R<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            // SAFETY: `buf[got..]` is writable memory of `len - got` bytes.
            let n = unsafe {
                libc::read(self.rd.as_raw_fd(), buf[got..].as_mut_ptr().cast(), len - got)
            };
            ensure!(n > 0, "pipe read: {}", std::io::Error::last_os_error());
            got += n as usize;
        }
        Ok(buf)
    }
}
