//! Regression tests for the refcount fixes of the kernel series: each fails on the stock
//! kernel (the series' Rust patches only) and passes on the patched one. `make test` runs them
//! on both kernels and reports the two columns.

use crate::harness::{Case, Ctx, Fail, Fixture, Variant, R};
use crate::hmm::{fill, local_prot, verify, Dev, Map, PAGE, PROT_DEV_MASK};
use crate::inspect::settled;
use crate::{diag, ensure, ensure_eq};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const CASES: &[Case] = &[Case {
    name: "migrate_referenced_coherent_page",
    fixture: Fixture::Module,
    timeout: 60,
    run: migrate_referenced_coherent_page,
}];

/// A pipe, both ends closed on drop.
struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
}

impl Pipe {
    fn new() -> R<Pipe> {
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
    fn vmsplice(&self, addr: usize, len: usize) -> R<usize> {
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

    fn read(&self, len: usize) -> R<Vec<u8>> {
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

/// `migrate_vma_check_page()` must refuse a device folio that something besides the
/// migration holds a reference on, as it refuses a system folio. Stock 7.3 allows one extra
/// reference on every ZONE_DEVICE folio (a leftover of device pages being free at refcount
/// one), so it migrates a coherent page that a pipe still references: the pipe keeps the old
/// page, and what the process writes afterwards never reaches the data the pipe will deliver.
fn migrate_referenced_coherent_page(ctx: &Ctx) -> R {
    let v = Variant::Coherent;
    let path = format!("/dev/{}", v.device());
    if !std::path::Path::new(&path).exists() {
        return Err(Fail::Skip(format!("{path} missing: no coherent range given")));
    }
    let dev = Dev::open(&path)?;
    let map = Map::anon(PAGE)?;
    let seed = ctx.config.seed ^ 0x5eed;
    fill(map.bytes(), seed);
    ensure_eq!(dev.to_dev(map.addr, 1)?, 1, "pages migrated to the coherent device");
    let on_device = |what: &str| -> R<bool> {
        let s = dev.snapshot(map.addr, 1)?[0];
        diag!("{what}: snapshot {s:#x}");
        Ok(s & PROT_DEV_MASK == local_prot(true))
    };
    ensure!(on_device("after MIGRATE_TO_DEV")?, "page not in coherent device memory");
    settled(v, 1)?;

    let pipe = Pipe::new()?;
    ensure_eq!(pipe.vmsplice(map.addr, PAGE)?, PAGE, "bytes spliced into the pipe");
    let moved = dev.to_sys(map.addr, 1)?;
    let stayed = on_device("after MIGRATE_TO_SYS with the pipe's reference")?;
    // The process writes its page; the pipe must deliver what the page holds.
    fill(map.bytes(), seed ^ 1);
    let piped = pipe.read(PAGE)?;
    let current = verify(&piped, seed ^ 1, "data the pipe delivers").is_ok();
    let stale = verify(&piped, seed, "data the pipe delivers").is_ok();
    diag!("MIGRATE_TO_SYS moved {moved} page(s); the pipe delivered {}", match (current, stale) {
        (true, _) => "the page's current data",
        (_, true) => "the data from before the migration (the process's later write is lost to it)",
        _ => "neither the old nor the new data",
    });
    ensure!(
        moved == 0 && stayed,
        "a coherent page referenced by a pipe was migrated (MIGRATE_TO_SYS moved {moved}): the \
         device folio's extra reference passed migrate_vma_check_page()"
    );
    ensure!(current, "the pipe did not deliver the page's current data");

    // Without the pipe's reference the page migrates.
    ensure_eq!(dev.to_sys(map.addr, 1)?, 1, "pages migrated back once unreferenced");
    settled(v, 0)?;
    verify(map.bytes(), seed ^ 1, "the page back in system memory")
}
