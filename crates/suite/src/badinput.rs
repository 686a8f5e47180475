//! Bad inputs, one case per row of the README's "Bad inputs" table: each asserts the exact
//! errno the driver gives (on each device kind), and that the call lost or wrote nothing it
//! must not. Also the copy-outs (never uninitialised memory) and the access rights of the
//! device nodes and of debugfs.

use crate::harness::{Case, Ctx, Fail, Fixture, R};
use crate::hmm::{fill, verify, Dev, Map};
use crate::{diag, ensure, ensure_eq};
use dmirror_abi::uapi::{
    command_name, ioc, iowr, valid_prot, Cmd, CHECK_EXCLUSIVE, COMMANDS, EXCLUSIVE, FLAGS,
    MIGRATE_TO_DEV, MIGRATE_TO_SYS, PAGE, PROT_ERROR, READ, READ_UNLOCKED, SNAPSHOT, WRITE,
};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

pub const CASES: &[Case] = &[
    case("bad_unknown_ioctl", bad_unknown_ioctl),
    case("bad_npages_zero", bad_npages_zero),
    case("bad_unaligned_addr", bad_unaligned_addr),
    case("bad_range_overflow", bad_range_overflow),
    case("bad_cmd_pointer", bad_cmd_pointer),
    case("bad_cmd_read_only", bad_cmd_read_only),
    case("bad_user_ptr", bad_user_ptr),
    case("bad_access_unmapped", bad_access_unmapped),
    case("bad_migrate_unmapped", bad_migrate_unmapped),
    case("bad_write_read_only", bad_write_read_only),
    case("bad_prot_none", bad_prot_none),
    case("bad_migrate_special", bad_migrate_special),
    case("bad_exclusive", bad_exclusive),
    case("bad_mm_gone", bad_mm_gone),
    case("copyout_never_uninitialised", copyout_never_uninitialised),
    Case {
        name: "nobody_denied",
        fixture: Fixture::Module,
        timeout: 30,
        run: nobody_denied,
    },
];

/// A device case with the bad-input cases' timeout.
const fn case(name: &'static str, run: fn(&Ctx) -> R) -> Case {
    Case {
        name,
        fixture: Fixture::Device,
        timeout: 60,
        run,
    }
}

/// An address in the kernel's direct map.
const KERNEL: usize = 0xffff_8880_0000_0000;
/// A non-canonical address.
const NON_CANONICAL: usize = 0xdead_0000_0000_0000;
/// The byte buffers are filled with before a copy-out.
const POISON: u8 = 0xa5;

/// The errno of a call's result, 0 for success.
fn errno<T>(r: &io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// The name of an errno, for messages.
fn name(e: i32) -> &'static str {
    match e {
        0 => "success",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EBADF => "EBADF",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => "another errno",
    }
}

/// Fails unless the result is `want` (an errno, 0 for success).
fn expect<T>(what: &str, r: &io::Result<T>, want: i32) -> R {
    let got = errno(r);
    ensure!(
        got == want,
        "{what}: got {} ({got}), expected {} ({want})",
        name(got),
        name(want)
    );
    Ok(())
}

/// The command name of a request.
fn cmd_name(req: u64) -> &'static str {
    command_name(req).unwrap_or("?")
}

/// A page-aligned address with nothing mapped: a page mapped, then unmapped.
fn unmapped_page() -> R<usize> {
    let m = Map::anon(PAGE)?;
    let addr = m.addr;
    drop(m);
    Ok(addr)
}

/// Changes the protection of `[addr, addr + len)`.
fn mprotect(addr: usize, len: usize, prot: i32) -> R {
    // SAFETY: Changes the protection of a mapping of the case's own.
    if unsafe { libc::mprotect(addr as *mut _, len, prot) } != 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(())
}

/// Unmaps `[addr, addr + len)`.
fn munmap(addr: usize, len: usize) {
    // SAFETY: Unmaps part of a mapping of the case's own, which nothing uses any more.
    unsafe { libc::munmap(addr as *mut _, len) };
}

/// A mapping of `pages` pages with the pattern of `seed`.
fn pattern(pages: usize, seed: u64) -> R<Map> {
    let m = Map::anon(pages * PAGE)?;
    fill(m.bytes(), seed);
    Ok(m)
}

/// Requests that are none of the ten: another type, numbers past 9, other sizes, other
/// directions; each refused with `ENOTTY` before the driver reads the block (a NULL block
/// too).
fn bad_unknown_ioctl(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = pattern(1, 1)?;
    let h = u64::from(b'H');
    let requests = [
        ("type 'G'", ioc(3, u64::from(b'G'), 0, 40)),
        ("nr 10", iowr(10)),
        ("nr 255", ioc(3, h, 255, 40)),
        ("size 0", ioc(3, h, 0, 0)),
        ("size 39", ioc(3, h, 0, 39)),
        ("size 41", ioc(3, h, 0, 41)),
        ("_IO", ioc(0, h, 0, 0)),
        ("_IOW", ioc(1, h, 1, 40)),
        ("_IOR", ioc(2, h, 0, 40)),
    ];
    for (what, req) in requests {
        expect(what, &dev.cmd(req, map.addr, 0, 1), libc::ENOTTY)?;
        // SAFETY: NULL: the kernel cannot access it.
        let r = unsafe { dev.ioctl_at(req, 0) };
        expect(&format!("{what}, NULL block"), &r, libc::ENOTTY)?;
    }
    verify(map.bytes(), 1, "the mapping")
}

/// `npages` 0: `EINVAL` for every command.
fn bad_npages_zero(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = pattern(4, 2)?;
    let buf = Map::anon(4 * PAGE)?;
    for (req, n) in COMMANDS {
        expect(n, &dev.cmd(req, map.addr, buf.addr, 0), libc::EINVAL)?;
    }
    verify(map.bytes(), 2, "the mapping")
}

/// `addr` not page-aligned: `EINVAL` for every command.
fn bad_unaligned_addr(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = pattern(4, 3)?;
    let buf = Map::anon(4 * PAGE)?;
    for (req, n) in COMMANDS {
        for off in [1, 8, PAGE / 2, PAGE - 1] {
            let r = dev.cmd(req, map.addr + off, buf.addr, 1);
            expect(&format!("{n} at page + {off}"), &r, libc::EINVAL)?;
        }
    }
    verify(map.bytes(), 3, "the mapping")
}

/// `npages * 4096` past 64 bits, and `addr + npages * 4096` past the top of the address
/// space (to exactly 2^64, and beyond).
fn bad_range_overflow(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = pattern(4, 4)?;
    let buf = Map::anon(4 * PAGE)?;
    let to_top = (0usize.wrapping_sub(map.addr)) / PAGE;
    let ranges = [
        ("npages 2^52", map.addr, 1 << 52),
        ("npages 2^64 - 1", map.addr, usize::MAX),
        ("the last page plus one", 0xffff_ffff_ffff_f000, 1),
        ("to exactly 2^64", map.addr, to_top),
        ("past 2^64", map.addr, to_top + 1),
    ];
    for (req, n) in COMMANDS {
        for (what, addr, npages) in ranges {
            let r = dev.cmd(req, addr, buf.addr, npages);
            expect(&format!("{n}, {what}"), &r, libc::EINVAL)?;
        }
    }
    verify(map.bytes(), 4, "the mapping")
}

/// A command block the kernel cannot read: NULL, unmapped, a kernel address, a non-canonical
/// one, `PROT_NONE`, or running off the end of a mapping into an unmapped page.
fn bad_cmd_pointer(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = pattern(4, 5)?;
    let none = Map::anon(PAGE)?;
    mprotect(none.addr, PAGE, libc::PROT_NONE)?;
    // A block whose first 16 bytes (addr, ptr) are at the end of a mapped page.
    let edge = Map::anon(2 * PAGE)?;
    munmap(edge.page(1), PAGE);
    let straddle = edge.page(1) - 16;
    edge.bytes()[PAGE - 16..PAGE - 8].copy_from_slice(&(map.addr as u64).to_le_bytes());
    let hole = unmapped_page()?;
    let blocks = [
        ("NULL", 0),
        ("unmapped", hole),
        ("kernel", KERNEL),
        ("non-canonical", NON_CANONICAL),
        ("PROT_NONE", none.addr),
        ("straddling into a hole", straddle),
    ];
    for (req, n) in COMMANDS {
        for (what, arg) in blocks {
            // SAFETY: None of the addresses is accessible as a 40-byte block.
            let r = unsafe { dev.ioctl_at(req, arg) };
            expect(&format!("{n}, block {what}"), &r, libc::EFAULT)?;
        }
    }
    verify(map.bytes(), 5, "the mapping")
}

/// A command block the kernel can read but not write: the command runs, then its results
/// cannot be written back (`EFAULT`), and the block is as it was.
fn bad_cmd_read_only(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = pattern(2, 6)?;
    let out = Map::anon(2 * PAGE)?;
    out.bytes().fill(POISON);
    let blocks = Map::anon(PAGE)?;
    let cases = [
        (FLAGS, 0, 0, 2),
        (CHECK_EXCLUSIVE, map.addr, 0, 2),
        (SNAPSHOT, map.addr, out.addr + PAGE, 2),
        (READ, map.addr, out.addr, 1),
    ];
    for (i, &(_, addr, ptr, npages)) in cases.iter().enumerate() {
        let c = Cmd {
            addr: addr as u64,
            ptr: ptr as u64,
            npages,
            cpages: 0,
            faults: 0,
        };
        for (k, v) in [c.addr, c.ptr, c.npages, c.cpages, c.faults]
            .iter()
            .enumerate()
        {
            blocks.bytes()[i * 64 + k * 8..i * 64 + k * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
    let before = blocks.bytes().to_vec();
    mprotect(blocks.addr, PAGE, libc::PROT_READ)?;
    for (i, &(req, ..)) in cases.iter().enumerate() {
        // SAFETY: The block is readable (and not writable: the kernel must refuse to write).
        let r = unsafe { dev.ioctl_at(req, blocks.addr + i * 64) };
        expect(
            &format!("{}, read-only block", cmd_name(req)),
            &r,
            libc::EFAULT,
        )?;
    }
    // SAFETY: The page is readable.
    let after = unsafe { std::slice::from_raw_parts(blocks.addr as *const u8, PAGE) };
    ensure!(after == &before[..], "a read-only command block changed");
    // The commands ran: their snapshot bytes and data are there.
    let snap = &out.bytes()[PAGE..PAGE + 2];
    ensure!(
        snap.iter().all(|&b| valid_prot(b)),
        "SNAPSHOT did not run: {snap:x?}"
    );
    ensure!(
        out.bytes()[..PAGE] == map.bytes()[..PAGE],
        "READ did not run"
    );
    mprotect(blocks.addr, PAGE, libc::PROT_READ | libc::PROT_WRITE)?;
    verify(map.bytes(), 6, "the mapping")
}

/// A `ptr` the kernel cannot use: `EFAULT`, and a WRITE from it writes nothing.
fn bad_user_ptr(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = pattern(8, 7)?;
    let hole = unmapped_page()?;
    let ro = Map::anon(8 * PAGE)?;
    mprotect(ro.addr, ro.len, libc::PROT_READ)?;
    for (what, ptr) in [
        ("NULL", 0),
        ("unmapped", hole),
        ("kernel", KERNEL),
        ("non-canonical", NON_CANONICAL),
    ] {
        for req in [READ, READ_UNLOCKED, WRITE, SNAPSHOT] {
            let r = dev.cmd(req, map.addr, ptr, 8);
            expect(&format!("{}, ptr {what}", cmd_name(req)), &r, libc::EFAULT)?;
        }
        verify(map.bytes(), 7, &format!("after WRITE from {what}"))?;
    }
    for req in [READ, READ_UNLOCKED, SNAPSHOT] {
        let r = dev.cmd(req, map.addr, ro.addr, 8);
        expect(
            &format!("{} into a read-only buffer", cmd_name(req)),
            &r,
            libc::EFAULT,
        )?;
    }
    // The migration and the exclusive access happen; the readback of their data fails.
    expect(
        "MIGRATE_TO_DEV, ptr NULL",
        &dev.cmd(MIGRATE_TO_DEV, map.addr, 0, 8),
        libc::EFAULT,
    )?;
    dev.to_sys(map.addr, 8)?;
    expect(
        "EXCLUSIVE, ptr NULL",
        &dev.cmd(EXCLUSIVE, map.addr, 0, 8),
        libc::EFAULT,
    )?;
    verify(map.bytes(), 7, "the mapping")
}

/// READ, READ_UNLOCKED and WRITE of a range with unmapped pages: `EFAULT`.
fn bad_access_unmapped(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = pattern(16, 8)?;
    munmap(map.page(8), 8 * PAGE);
    let buf = Map::anon(16 * PAGE)?;
    fill(buf.bytes(), 9);
    let ranges = [
        ("a hole", map.page(8), 8),
        ("past a mapping's end", map.addr, 16),
        ("address 0", 0, 1),
        ("kernel addresses", KERNEL, 4),
    ];
    for (what, addr, npages) in ranges {
        for req in [READ, READ_UNLOCKED, WRITE] {
            let r = dev.cmd(req, addr, buf.addr, npages);
            expect(&format!("{} of {what}", cmd_name(req)), &r, libc::EFAULT)?;
        }
    }
    verify(&map.bytes()[..8 * PAGE], 8, "the mapped half")
}

/// MIGRATE_TO_DEV and MIGRATE_TO_SYS of a range with unmapped pages: `EINVAL`, and the data
/// of the mapped part intact.
fn bad_migrate_unmapped(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = pattern(16, 10)?;
    munmap(map.page(8), 8 * PAGE);
    let buf = Map::anon(16 * PAGE)?;
    let ranges = [
        ("a hole", map.page(8), 8),
        ("past a mapping's end", map.addr, 16),
        ("address 0", 0, 1),
        ("kernel addresses", KERNEL, 4),
    ];
    for (what, addr, npages) in ranges {
        for req in [MIGRATE_TO_DEV, MIGRATE_TO_SYS] {
            let r = dev.cmd(req, addr, buf.addr, npages);
            expect(&format!("{} of {what}", cmd_name(req)), &r, libc::EINVAL)?;
        }
    }
    verify(&map.bytes()[..8 * PAGE], 10, "the mapped half")
}

/// WRITE to a read-only mapping: `EPERM`, in system or in device memory, nothing written.
fn bad_write_read_only(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = pattern(8, 11)?;
    mprotect(map.addr, map.len, libc::PROT_READ)?;
    let junk = vec![0x5au8; 8 * PAGE];
    expect(
        "WRITE to a read-only mapping",
        &dev.write(map.addr, &junk).map(|_| ()),
        libc::EPERM,
    )?;
    // The same with the pages in device memory.
    dev.to_dev(map.addr, 8)?;
    expect(
        "WRITE to it on the device",
        &dev.write(map.addr, &junk).map(|_| ()),
        libc::EPERM,
    )?;
    dev.to_sys(map.addr, 8)?;
    // SAFETY: The mapping is readable.
    let cpu = unsafe { std::slice::from_raw_parts(map.addr as *const u8, map.len) };
    verify(cpu, 11, "after the refused writes")?;
    mprotect(map.addr, map.len, libc::PROT_READ | libc::PROT_WRITE)
}

/// A `PROT_NONE` range: migrations `EINVAL`, device accesses `EFAULT`.
fn bad_prot_none(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = pattern(8, 12)?;
    let buf = Map::anon(8 * PAGE)?;
    mprotect(map.addr, map.len, libc::PROT_NONE)?;
    for (req, want) in [
        (MIGRATE_TO_DEV, libc::EINVAL),
        (MIGRATE_TO_SYS, libc::EINVAL),
        (READ, libc::EFAULT),
        (READ_UNLOCKED, libc::EFAULT),
        (WRITE, libc::EFAULT),
        (EXCLUSIVE, libc::EFAULT),
    ] {
        let r = dev.cmd(req, map.addr, buf.addr, 8);
        expect(&format!("{} of PROT_NONE", cmd_name(req)), &r, want)?;
    }
    mprotect(map.addr, map.len, libc::PROT_READ | libc::PROT_WRITE)?;
    verify(map.bytes(), 12, "after PROT_NONE")
}

/// A shared mapping of `pages` pages of a new tmpfs file with the pattern of `seed`.
fn file_mapping(pages: usize, seed: u64) -> R<(Map, std::fs::File)> {
    let path = format!("/tmp/dmirror-badinput.{}", std::process::id());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)?;
    let _ = std::fs::remove_file(&path);
    let mut data = vec![0u8; pages * PAGE];
    fill(&mut data, seed);
    (&f).write_all(&data)?;
    Ok((shared_map(f.as_raw_fd(), pages)?, f))
}

/// Maps `pages` pages of `fd` shared, read-write.
fn shared_map(fd: i32, pages: usize) -> R<Map> {
    // SAFETY: A new shared mapping of a descriptor of the case's own.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error().into());
    }
    Ok(Map {
        addr: p as usize,
        len: pages * PAGE,
    })
}

/// Mappings migration cannot take: the device's own `mmap` (`VM_MIXEDMAP`), refused with
/// `EINVAL`; a shared file mapping, whose pages stay where they are (MIGRATE_TO_DEV
/// `ENOENT`: they did not reach the device; MIGRATE_TO_SYS has nothing to do).
fn bad_migrate_special(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let buf = Map::anon(4 * PAGE)?;
    let devmap = shared_map(dev.raw_fd(), 4)?;
    for req in [MIGRATE_TO_DEV, MIGRATE_TO_SYS] {
        let r = dev.cmd(req, devmap.addr, buf.addr, 4);
        expect(
            &format!("{} of the device's mmap", cmd_name(req)),
            &r,
            libc::EINVAL,
        )?;
    }
    let r = dev.read(devmap.addr, 4);
    expect("READ of the device's mmap", &r, 0)?;
    ensure!(
        r?.iter().all(|&b| b == 0),
        "the device's mmap is not zeroed"
    );
    let (file, _f) = file_mapping(4, 13)?;
    let r = dev.cmd(MIGRATE_TO_DEV, file.addr, buf.addr, 4);
    expect("MIGRATE_TO_DEV of a shared file mapping", &r, libc::ENOENT)?;
    let r = dev.cmd(MIGRATE_TO_SYS, file.addr, 0, 4);
    expect("MIGRATE_TO_SYS of a shared file mapping", &r, 0)?;
    ensure_eq!(r?.cpages, 0, "file pages migrated back");
    verify(file.bytes(), 13, "the file mapping")
}

/// EXCLUSIVE needs private anonymous memory it can write: a file or the device's mapping is
/// `EOPNOTSUPP`, a read-only or unmapped page `EFAULT`. It works on anonymous memory, and
/// then CHECK_EXCLUSIVE says so (`EPERM`).
fn bad_exclusive(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let buf = Map::anon(4 * PAGE)?;
    let (file, _f) = file_mapping(4, 14)?;
    let r = dev.cmd(EXCLUSIVE, file.addr, buf.addr, 4);
    expect("EXCLUSIVE of a shared file mapping", &r, libc::EOPNOTSUPP)?;
    let devmap = shared_map(dev.raw_fd(), 4)?;
    let r = dev.cmd(EXCLUSIVE, devmap.addr, buf.addr, 4);
    expect("EXCLUSIVE of the device's mmap", &r, libc::EOPNOTSUPP)?;
    let ro = pattern(4, 15)?;
    mprotect(ro.addr, ro.len, libc::PROT_READ)?;
    let r = dev.cmd(EXCLUSIVE, ro.addr, buf.addr, 4);
    expect("EXCLUSIVE of a read-only mapping", &r, libc::EFAULT)?;
    let r = dev.cmd(EXCLUSIVE, unmapped_page()?, buf.addr, 1);
    expect("EXCLUSIVE of an unmapped page", &r, libc::EFAULT)?;
    let anon = pattern(4, 16)?;
    expect(
        "EXCLUSIVE of anonymous memory",
        &dev.cmd(EXCLUSIVE, anon.addr, buf.addr, 4),
        0,
    )?;
    let r = dev.cmd(CHECK_EXCLUSIVE, anon.addr, 0, 4);
    expect("CHECK_EXCLUSIVE after it", &r, libc::EPERM)?;
    verify(
        anon.bytes(),
        16,
        "the exclusive pages, back through the CPU",
    )?;
    verify(file.bytes(), 14, "the file mapping")
}

/// Runs `f` in a forked child; its result comes back through a pipe.
fn in_child(f: impl FnOnce() -> R) -> R {
    let (rd, wr) = pipe()?;
    // SAFETY: The child runs `f` and exits; the parent only reads and waits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error().into());
    }
    if pid == 0 {
        drop(rd);
        let msg = match f() {
            Ok(()) => "P".to_string(),
            Err(Fail::Skip(m)) => format!("S{m}"),
            Err(Fail::Fail(m)) => format!("F{m}"),
        };
        let _ = std::fs::File::from(wr).write_all(msg.as_bytes());
        // SAFETY: Ends the child.
        unsafe { libc::_exit(0) };
    }
    drop(wr);
    let mut out = String::new();
    let _ = std::fs::File::from(rd).read_to_string(&mut out);
    // SAFETY: Waits for our child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    match out.split_at_checked(1) {
        Some(("P", _)) => Ok(()),
        Some(("S", m)) => Err(Fail::Skip(m.into())),
        Some(("F", m)) => Err(Fail::Fail(m.into())),
        _ => Err(Fail::Fail("the child died without a result".into())),
    }
}

/// A pipe, both ends close-on-exec.
fn pipe() -> R<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: Both descriptors were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The address space a file mirrors is gone (the opener exited; the descriptor lives on in
/// its child): the accesses give `EFAULT`, the migrations, SNAPSHOT and EXCLUSIVE `EINVAL`
/// (as the C reference), the others do not need it.
fn bad_mm_gone(ctx: &Ctx) -> R {
    let path = ctx.path();
    let (rd, wr) = pipe()?;
    // SAFETY: The child opens the device, forks the grandchild that uses it, and exits.
    let opener = unsafe { libc::fork() };
    if opener < 0 {
        return Err(io::Error::last_os_error().into());
    }
    if opener == 0 {
        drop(rd);
        let Ok(dev) = Dev::open(&path) else {
            // SAFETY: Ends the child.
            unsafe { libc::_exit(1) };
        };
        // SAFETY: The grandchild waits for this process to be gone, then makes the calls.
        if unsafe { libc::fork() } == 0 {
            // SAFETY: Plain system calls.
            while unsafe { libc::getppid() } == opener {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let result = (|| -> R {
                let map = pattern(2, 17)?;
                let buf = Map::anon(2 * PAGE)?;
                // The opener's exit dropped its own hold on the address space, but a kernel
                // thread that was scanning it (khugepaged) may hold it a little longer:
                // SNAPSHOT succeeds until the last holder lets go.
                let started = std::time::Instant::now();
                while dev.cmd(SNAPSHOT, map.addr, buf.addr, 2).is_ok() {
                    ensure!(
                        started.elapsed() < std::time::Duration::from_secs(10),
                        "the opener's address space is still there 10 s after it exited"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                for (req, want) in [
                    (READ, libc::EFAULT),
                    (READ_UNLOCKED, libc::EFAULT),
                    (WRITE, libc::EFAULT),
                    (MIGRATE_TO_DEV, libc::EINVAL),
                    (MIGRATE_TO_SYS, libc::EINVAL),
                    (SNAPSHOT, libc::EINVAL),
                    (EXCLUSIVE, libc::EINVAL),
                    (CHECK_EXCLUSIVE, 0),
                    (FLAGS, 0),
                ] {
                    let r = dev.cmd(req, map.addr, buf.addr, 2);
                    expect(&format!("{} with the opener gone", cmd_name(req)), &r, want)?;
                }
                Ok(())
            })();
            let msg = match result {
                Ok(()) => "P".to_string(),
                Err(Fail::Fail(m) | Fail::Skip(m)) => format!("F{m}"),
            };
            let _ = std::fs::File::from(wr).write_all(msg.as_bytes());
            // SAFETY: Ends the grandchild.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: Ends the opener; its address space goes with it.
        unsafe { libc::_exit(0) };
    }
    drop(wr);
    // SAFETY: Waits for our child.
    unsafe { libc::waitpid(opener, std::ptr::null_mut(), 0) };
    let mut out = String::new();
    let _ = std::fs::File::from(rd).read_to_string(&mut out);
    match out.split_at_checked(1) {
        Some(("P", _)) => Ok(()),
        Some((_, m)) => Err(Fail::Fail(m.into())),
        None => Err(Fail::Fail("the grandchild died without a result".into())),
    }
}

/// Checks the copy-out of `npages` pages into `buf`: on success every page is `want`'s (the
/// data, or zeroes for a page never touched); on failure every page is that or all poison,
/// the written ones first. Every byte past the range is still poison.
fn copied_out(buf: &[u8], want: &[u8], npages: usize, failed: bool, what: &str) -> R {
    let mut poisoned = false;
    for p in 0..npages {
        let got = &buf[p * PAGE..(p + 1) * PAGE];
        if got.iter().all(|&b| b == POISON) && failed {
            poisoned = true;
            continue;
        }
        ensure!(
            !poisoned,
            "{what}: page {p} was written after an unwritten one"
        );
        ensure!(
            got == &want[p * PAGE..(p + 1) * PAGE],
            "{what}: page {p} is neither its data nor untouched ({} poison bytes)",
            got.iter().filter(|&&b| b == POISON).count()
        );
    }
    ensure!(
        buf[npages * PAGE..].iter().all(|&b| b == POISON),
        "{what}: bytes past the range were written"
    );
    Ok(())
}

/// READ, READ_UNLOCKED, MIGRATE_TO_DEV's and EXCLUSIVE's readback and SNAPSHOT copy out
/// only real data: the pages' data, zeroes for pages never touched, one valid byte per page
/// (`PROT_ERROR` for unmapped ones); what a failed call did not write is left as it was.
fn copyout_never_uninitialised(ctx: &Ctx) -> R {
    let dev = Dev::open(&ctx.path())?;
    let map = Map::anon(64 * PAGE)?;
    let seed = ctx.config.seed ^ 0xc09e;
    let mut want = vec![0u8; map.len];
    fill(&mut want, seed);
    for p in (1..64).step_by(2) {
        want[p * PAGE..(p + 1) * PAGE].fill(0);
    }
    for p in (0..64).step_by(2) {
        map.bytes()[p * PAGE..(p + 1) * PAGE].copy_from_slice(&want[p * PAGE..(p + 1) * PAGE]);
    }
    // Pages 48..56 are a hole.
    munmap(map.page(48), 8 * PAGE);
    let mut buf = vec![POISON; 65 * PAGE];
    for req in [READ, READ_UNLOCKED] {
        let n = cmd_name(req);
        buf.fill(POISON);
        let r = dev.cmd(req, map.addr, buf.as_mut_ptr() as usize, 48);
        expect(&format!("{n} of 48 pages"), &r, 0)?;
        copied_out(&buf, &want, 48, false, n)?;
        buf.fill(POISON);
        let r = dev.cmd(req, map.addr, buf.as_mut_ptr() as usize, 64);
        expect(&format!("{n} through the hole"), &r, libc::EFAULT)?;
        copied_out(&buf, &want, 64, true, &format!("{n} through the hole"))?;
    }
    // One byte per page: valid values only, the hole's pages PROT_ERROR, nothing past them.
    let mut snap = vec![POISON; PAGE];
    let r = dev.cmd(SNAPSHOT, map.addr, snap.as_mut_ptr() as usize, 64);
    expect("SNAPSHOT through the hole", &r, 0)?;
    for (p, &b) in snap[..64].iter().enumerate() {
        ensure!(valid_prot(b), "SNAPSHOT byte {p} is {b:#x}");
        ensure_eq!(
            b == PROT_ERROR,
            (48..56).contains(&p),
            "SNAPSHOT byte {p} ({b:#x}) is PROT_ERROR"
        );
    }
    ensure!(
        snap[64..].iter().all(|&b| b == POISON),
        "SNAPSHOT wrote past its range"
    );
    buf.fill(POISON);
    let r = dev.cmd(MIGRATE_TO_DEV, map.addr, buf.as_mut_ptr() as usize, 48);
    expect("MIGRATE_TO_DEV of 48 pages", &r, 0)?;
    copied_out(&buf, &want, 48, false, "MIGRATE_TO_DEV's readback")?;
    buf.fill(POISON);
    let r = dev.cmd(READ, map.addr, buf.as_mut_ptr() as usize, 48);
    expect("READ of the device's pages", &r, 0)?;
    copied_out(&buf, &want, 48, false, "READ of the device's pages")?;
    buf.fill(POISON);
    let r = dev.cmd(MIGRATE_TO_DEV, map.page(40), buf.as_mut_ptr() as usize, 24);
    expect("MIGRATE_TO_DEV through the hole", &r, libc::EINVAL)?;
    copied_out(
        &buf,
        &want[40 * PAGE..],
        24,
        true,
        "MIGRATE_TO_DEV through the hole",
    )?;
    buf.fill(POISON);
    let r = dev.cmd(EXCLUSIVE, map.addr, buf.as_mut_ptr() as usize, 8);
    expect("EXCLUSIVE of 8 pages", &r, 0)?;
    copied_out(&buf, &want, 8, false, "EXCLUSIVE's readback")?;
    diag!("every copy-out held real data, zeroes or untouched poison");
    dev.to_sys(map.addr, 48)?;
    ensure!(
        map.bytes()[..48 * PAGE] == want[..48 * PAGE],
        "the data after the copy-outs"
    );
    munmap(map.addr, 48 * PAGE);
    munmap(map.page(56), 8 * PAGE);
    map.forget();
    Ok(())
}

/// As the unprivileged user `nobody`, opening a device node or anything of dmirror's in
/// debugfs is refused with `EACCES`.
fn nobody_denied(_ctx: &Ctx) -> R {
    let nodes: Vec<String> = (0..4)
        .map(|n| format!("/dev/hmm_dmirror{n}"))
        .filter(|p| std::path::Path::new(p).exists())
        .collect();
    ensure!(!nodes.is_empty(), "no device node");
    for p in &nodes {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p)?;
        diag!(
            "{p}: mode {:o}, owner {}:{}",
            m.mode() & 0o7777,
            m.uid(),
            m.gid()
        );
    }
    let debugfs = [
        "/sys/kernel/debug/dmirror",
        "/sys/kernel/debug/dmirror/pfn",
        "/sys/kernel/debug/dmirror/hmm_dmirror0/stats",
        "/sys/kernel/debug/dmirror/hmm_dmirror0/check",
    ];
    in_child(|| {
        // SAFETY: Drops this child's privileges for good: groups, then gids, then uids.
        let dropped = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(65534, 65534, 65534) == 0
                && libc::setresuid(65534, 65534, 65534) == 0
        };
        ensure!(
            dropped,
            "cannot become nobody: {}",
            io::Error::last_os_error()
        );
        // SAFETY: Plain system calls.
        ensure!(unsafe { libc::geteuid() } == 65534, "still privileged");
        let open = |p: &str, write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(p)
                .map(|_| ())
        };
        for p in &nodes {
            expect(
                &format!("nobody opening {p} read-write"),
                &open(p, true),
                libc::EACCES,
            )?;
            expect(
                &format!("nobody opening {p} read-only"),
                &open(p, false),
                libc::EACCES,
            )?;
        }
        for p in debugfs {
            expect(
                &format!("nobody opening {p}"),
                &open(p, false),
                libc::EACCES,
            )?;
        }
        let r = std::fs::read_dir("/sys/kernel/debug/dmirror").map(|_| ());
        expect("nobody listing /sys/kernel/debug/dmirror", &r, libc::EACCES)
    })
}
