//! The fuzzer's address space: one reservation carved into regions of every kind a command
//! can meet, each followed by an unmapped hole, and the classification of addresses and
//! ranges against it.
//!
//! The holes bound every command: the ones that fault, migrate or pin stop at the first
//! unmapped page, and every region ends at one, so no range that starts in the arena reaches
//! memory the fuzzer does not own. Nothing may be mapped into a hole later: the arena is built
//! once every thread runs (a new thread maps a small signal stack, which would land in a hole
//! and join the arena to the mappings above it), and the holes are checked then and at the
//! end.
//!
//! Regions whose contents the fuzzer checks (the pattern, the THP, the read-only pages and
//! the mirrors of the first two) are never written with other data: a WRITE into the pattern
//! or the THP takes its source from the mirror at the same offset, so even a WRITE that
//! succeeds leaves them as they were.

use dmirror_abi::uapi::{Cmd, PAGE};
use dmirror_suite::hmm::{fill, THP};
use std::os::fd::AsRawFd;

/// What a page of the arena is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A 2 MiB anonymous THP with a pattern.
    Thp,
    /// Anonymous 4 KiB pages, half of them never touched; anything may be written here.
    Anon,
    /// Anonymous 4 KiB pages with a pattern.
    Pattern,
    /// Read-only anonymous pages with a pattern.
    ReadOnly,
    /// A `PROT_NONE` mapping.
    ProtNone,
    /// A shared mapping of a tmpfs file.
    File,
    /// The device's own `mmap` (`VM_MIXEDMAP`).
    DevMap,
    /// 2 MiB another thread keeps changing: `PROT_NONE` and back, `MADV_DONTNEED`, remapped
    /// (with `MADV_HUGEPAGE`, so that it gets a THP again when touched).
    Churn,
    /// A thread's buffer for `ptr` (the thread's number).
    Scratch(usize),
    /// A copy of the pattern, the source of WRITEs into it.
    MirrorPattern,
    /// A copy of the THP's pattern, the source of WRITEs into it.
    MirrorThp,
    /// Read-only command blocks.
    CmdReadOnly,
    /// Nothing mapped: a hole in the arena, or an address outside it that nothing maps.
    Hole,
}

impl Kind {
    /// The kind's name in reports.
    pub fn name(self) -> String {
        match self {
            Kind::Scratch(t) => format!("scratch{t}"),
            k => format!("{k:?}"),
        }
    }
}

/// A mapped region.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub kind: Kind,
    pub start: u64,
    pub len: u64,
}

impl Region {
    /// The first address past the region.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// The region's size in pages.
    pub fn pages(&self) -> u64 {
        self.len / PAGE as u64
    }

    /// Whether `addr` is in the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end()
    }
}

/// The command blocks of the read-only page, 64 bytes apart.
pub const CMD_BLOCKS: usize = 6;

/// The arena.
pub struct Arena {
    pub start: u64,
    pub end: u64,
    /// Mapped regions in address order.
    pub regions: Vec<Region>,
    /// Unmapped holes inside the arena.
    pub holes: Vec<Region>,
    /// What the checked regions hold.
    pattern: Vec<u8>,
    thp: Vec<u8>,
    read_only: Vec<u8>,
    cmd_page: Vec<u8>,
}

/// Regions in order, with their size in pages and the hole after them (pages); the scratch
/// buffers, one per thread, come where `Scratch(0)` is. The churn region and the THP start
/// on 2 MiB boundaries (the `PROT_NONE` region pads).
const LAYOUT: &[(Kind, u64, u64)] = &[
    (Kind::Churn, 512, 1),
    (Kind::ProtNone, 510, 1),
    (Kind::Thp, 512, 3),
    (Kind::Anon, 64, 1),
    (Kind::Pattern, 64, 2),
    (Kind::ReadOnly, 16, 4),
    (Kind::File, 16, 1),
    (Kind::DevMap, 8, 2),
    (Kind::Scratch(0), SCRATCH_PAGES, 1),
    (Kind::MirrorPattern, 64, 1),
    (Kind::MirrorThp, 512, 1),
    (Kind::CmdReadOnly, 1, 16),
];

/// Pages of each thread's scratch buffer: more than one 128-page bounce window of the driver.
pub const SCRATCH_PAGES: u64 = 160;

/// Panics with the OS error unless a system call returned 0 (set-up only).
fn sys(r: i32, what: &str) {
    assert!(r == 0, "{what}: {}", std::io::Error::last_os_error());
}

/// Maps `len` bytes at `addr` (which the arena reserved) with `prot` and `flags`.
fn map_fixed(addr: u64, len: u64, prot: i32, flags: i32, fd: i32) {
    // MAP_FIXED replaces what is mapped there.
    // SAFETY: `[addr, addr + len)` is the arena's own reservation (or a hole in it): unused.
    let p = unsafe {
        libc::mmap(
            addr as *mut _,
            len as usize,
            prot,
            flags | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    assert!(
        p as u64 == addr,
        "mmap at {addr:#x}: {}",
        std::io::Error::last_os_error()
    );
}

impl Arena {
    /// Builds the arena for `threads` threads: maps every region, fills the checked ones
    /// from `seed`, and maps `devmap_fd` (a device) as the device's own mapping.
    pub fn new(threads: usize, seed: u64, devmap_fd: &impl AsRawFd) -> Arena {
        let mut layout = Vec::new();
        for &(kind, pages, hole) in LAYOUT {
            if kind == Kind::Scratch(0) {
                for t in 0..threads {
                    layout.push((Kind::Scratch(t), pages, hole));
                }
            } else {
                layout.push((kind, pages, hole));
            }
        }
        let total: u64 = layout.iter().map(|&(_, p, h)| (p + h) * PAGE as u64).sum();
        let reserve = total + THP as u64;
        // SAFETY: A fresh reservation; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert!(base != libc::MAP_FAILED, "cannot reserve the arena");
        let base = base as u64;
        let start = base.next_multiple_of(THP as u64);
        // SAFETY: Trims our own reservation to `[start, start + total)`.
        unsafe {
            if start > base {
                libc::munmap(base as *mut _, (start - base) as usize);
            }
            libc::munmap(
                (start + total) as *mut _,
                (base + reserve - start - total) as usize,
            );
        }
        let mut arena = Arena {
            start,
            end: start + total,
            regions: Vec::new(),
            holes: Vec::new(),
            pattern: vec![0; 64 * PAGE],
            thp: vec![0; THP],
            read_only: vec![0; 16 * PAGE],
            cmd_page: vec![0; PAGE],
        };
        fill(&mut arena.pattern, seed ^ 0x5041_5454);
        fill(&mut arena.thp, seed ^ 0x5448_5000);
        fill(&mut arena.read_only, seed ^ 0x524f_0000);
        let mut at = start;
        for (kind, pages, hole) in layout {
            let len = pages * PAGE as u64;
            arena.regions.push(Region {
                kind,
                start: at,
                len,
            });
            at += len;
            arena.holes.push(Region {
                kind: Kind::Hole,
                start: at,
                len: hole * PAGE as u64,
            });
            at += hole * PAGE as u64;
        }
        arena.cmd_page = arena.command_blocks();
        for r in arena.regions.clone() {
            arena.map(&r, devmap_fd);
        }
        for h in &arena.holes {
            // SAFETY: Unmaps part of our own reservation.
            let r = unsafe { libc::munmap(h.start as *mut _, h.len as usize) };
            sys(r, "munmap");
        }
        arena
    }

    /// Maps region `r` and fills it.
    fn map(&self, r: &Region, devmap_fd: &impl AsRawFd) {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let private = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let fill_from = |src: &[u8]| {
            // SAFETY: The region was just mapped read-write and is ours.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), r.start as *mut u8, src.len());
            }
        };
        let advise = |advice| {
            // SAFETY: Advice on our own mapping.
            unsafe { libc::madvise(r.start as *mut _, r.len as usize, advice) };
        };
        match r.kind {
            Kind::Thp => {
                map_fixed(r.start, r.len, rw, private, -1);
                advise(libc::MADV_HUGEPAGE);
                fill_from(&self.thp);
            }
            Kind::Anon => {
                map_fixed(r.start, r.len, rw, private, -1);
                advise(libc::MADV_NOHUGEPAGE);
                let mut data = vec![0u8; PAGE];
                for p in (0..r.pages()).step_by(2) {
                    fill(&mut data, r.start ^ p);
                    // SAFETY: Page `p` is inside the region, just mapped read-write.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data.as_ptr(),
                            (r.start + p * PAGE as u64) as *mut u8,
                            PAGE,
                        );
                    }
                }
            }
            Kind::Pattern | Kind::MirrorPattern => {
                map_fixed(r.start, r.len, rw, private, -1);
                advise(libc::MADV_NOHUGEPAGE);
                fill_from(&self.pattern);
            }
            Kind::MirrorThp => {
                map_fixed(r.start, r.len, rw, private, -1);
                fill_from(&self.thp);
            }
            Kind::ReadOnly | Kind::CmdReadOnly => {
                map_fixed(r.start, r.len, rw, private, -1);
                advise(libc::MADV_NOHUGEPAGE);
                fill_from(if r.kind == Kind::ReadOnly {
                    &self.read_only
                } else {
                    &self.cmd_page
                });
                let ro = libc::PROT_READ;
                // SAFETY: Changes the protection of our own mapping.
                let done = unsafe { libc::mprotect(r.start as *mut _, r.len as usize, ro) };
                sys(done, "mprotect");
            }
            Kind::ProtNone => map_fixed(r.start, r.len, libc::PROT_NONE, private, -1),
            Kind::File => {
                let path = format!("/tmp/dmirror-fuzz.{}", std::process::id());
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .expect("cannot create the tmpfs file");
                f.set_len(r.len).expect("cannot size the tmpfs file");
                map_fixed(r.start, r.len, rw, libc::MAP_SHARED, f.as_raw_fd());
                let _ = std::fs::remove_file(&path);
                let mut data = vec![0u8; r.len as usize];
                fill(&mut data, r.start);
                fill_from(&data);
            }
            Kind::DevMap => {
                map_fixed(r.start, r.len, rw, libc::MAP_SHARED, devmap_fd.as_raw_fd());
            }
            Kind::Churn => {
                map_fixed(r.start, r.len, rw, private, -1);
                advise(libc::MADV_HUGEPAGE);
                // SAFETY: As `fill_from`.
                unsafe { std::ptr::write_bytes(r.start as *mut u8, 0x22, PAGE) };
            }
            Kind::Scratch(_) => {
                map_fixed(r.start, r.len, rw, private, -1);
                advise(libc::MADV_NOHUGEPAGE);
                // SAFETY: As `fill_from`.
                unsafe { std::ptr::write_bytes(r.start as *mut u8, 0x11, r.len as usize) };
            }
            Kind::Hole => {}
        }
    }

    /// The command blocks of the read-only page: READ-sized ranges in the free anonymous
    /// region (whatever a command does there is allowed) or unmapped, with `ptr` in the
    /// device mapping or the file (writable, unchecked), two of them refused by the checks.
    fn command_blocks(&self) -> Vec<u8> {
        let anon = self.region(Kind::Anon).start;
        let devmap = self.region(Kind::DevMap).start;
        let file = self.region(Kind::File).start;
        let hole = self.holes[0].start;
        let blocks = [
            (anon, devmap, 1),
            (anon + 4 * PAGE as u64, file, 3),
            (hole, devmap, 1),
            (anon, devmap, 0),
            (anon + 1, devmap, 1),
            (0xffff_8880_0000_0000, devmap, 1),
        ];
        let mut page = vec![0u8; PAGE];
        for (i, (addr, ptr, npages)) in blocks.into_iter().enumerate() {
            let c = Cmd {
                addr,
                ptr,
                npages,
                cpages: 0x5555,
                faults: 0xaaaa,
            };
            page[i * 64..i * 64 + 40].copy_from_slice(&cmd_bytes(&c));
        }
        page
    }

    /// The first region of `kind`.
    pub fn region(&self, kind: Kind) -> &Region {
        self.regions
            .iter()
            .find(|r| r.kind == kind)
            .expect("every kind has a region")
    }

    /// The region holding `addr`, if one does.
    pub fn region_at(&self, addr: u64) -> Option<&Region> {
        if addr < self.start || addr >= self.end {
            return None;
        }
        self.regions.iter().find(|r| r.contains(addr))
    }

    /// What is at `addr` (the fuzzer only picks outside addresses that nothing maps).
    pub fn kind_at(&self, addr: u64) -> Kind {
        self.region_at(addr).map_or(Kind::Hole, |r| r.kind)
    }

    /// The kinds of `[addr, end)` in address order, up to and including the first unmapped
    /// page: where a command that faults, migrates or pins page by page must stop.
    pub fn path(&self, addr: u64, end: u64) -> Vec<Kind> {
        let mut kinds = Vec::new();
        let mut at = addr;
        while at < end {
            match self.region_at(at) {
                Some(r) => {
                    kinds.push(r.kind);
                    at = r.end();
                }
                None => {
                    kinds.push(Kind::Hole);
                    break;
                }
            }
        }
        kinds
    }

    /// The mappings of this process now (`/proc/self/maps`): start, end, the line.
    pub fn maps() -> Vec<(u64, u64, String)> {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap_or_default()
            .lines()
            // The vsyscall page is the kernel's gate area: no VMA a command can reach.
            .filter(|l| !l.ends_with("[vsyscall]"))
            .filter_map(|l| {
                let (a, b) = l.split_once(' ')?.0.split_once('-')?;
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                    l.to_string(),
                ))
            })
            .collect()
    }

    /// The first mapping outside the arena that a command walking `[addr, end)` page by page
    /// (up to the first unmapped page) would reach, given the mappings `maps`.
    pub fn foreign<'m>(
        &self,
        maps: &'m [(u64, u64, String)],
        addr: u64,
        end: u64,
    ) -> Option<&'m str> {
        let mut at = addr;
        while at < end {
            let (a, b, line) = maps.iter().find(|m| m.0 <= at && at < m.1)?;
            if *a < self.start || *b > self.end {
                return Some(line);
            }
            at = *b;
        }
        None
    }

    /// Whether `[addr, end)` overlaps a region for which `pred` holds.
    pub fn overlaps(&self, addr: u64, end: u64, pred: impl Fn(Kind) -> bool) -> bool {
        self.regions
            .iter()
            .any(|r| pred(r.kind) && r.start < end && addr < r.end())
    }

    /// The bytes from `ptr` on that the kernel can write (`write`) or read there: to the end
    /// of its region, 0 where nothing (or nothing accessible) is mapped.
    pub fn room(&self, ptr: u64, write: bool) -> u64 {
        let Some(r) = self.region_at(ptr) else {
            return 0;
        };
        let ok = match r.kind {
            Kind::ProtNone | Kind::Hole => false,
            // Its protection changes all the time: never used as a buffer.
            Kind::Churn => false,
            Kind::ReadOnly | Kind::CmdReadOnly => !write,
            _ => true,
        };
        if ok {
            r.end() - ptr
        } else {
            0
        }
    }

    /// What a checked region holds, for `[addr, addr + len)` inside it.
    pub fn expected(&self, addr: u64, len: u64) -> Option<&[u8]> {
        let r = self.region_at(addr)?;
        let data = match r.kind {
            Kind::Pattern | Kind::MirrorPattern => &self.pattern,
            Kind::Thp | Kind::MirrorThp => &self.thp,
            Kind::ReadOnly => &self.read_only,
            Kind::CmdReadOnly => &self.cmd_page,
            _ => return None,
        };
        let off = (addr - r.start) as usize;
        data.get(off..off + len as usize)
    }

    /// The prepared command block `i` of the read-only page, and its address.
    pub fn command_block(&self, i: usize) -> (u64, Cmd) {
        let at = self.region(Kind::CmdReadOnly).start + (i * 64) as u64;
        let b = &self.cmd_page[i * 64..i * 64 + 40];
        let word =
            |k: usize| u64::from_le_bytes(b[k * 8..k * 8 + 8].try_into().unwrap_or_default());
        (
            at,
            Cmd {
                addr: word(0),
                ptr: word(1),
                npages: word(2),
                cpages: word(3),
                faults: word(4),
            },
        )
    }

    /// Compares every checked region with what it should hold, through the CPU (which brings
    /// pages back from device memory); returns the differences.
    pub fn verify(&self) -> Vec<String> {
        let mut bad = Vec::new();
        for r in &self.regions {
            let Some(want) = self.expected(r.start, r.len) else {
                continue;
            };
            // SAFETY: Checked regions are mapped and readable for the arena's lifetime.
            let got = unsafe { std::slice::from_raw_parts(r.start as *const u8, r.len as usize) };
            if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
                let page = at / PAGE;
                let wrong = got[page * PAGE..(page + 1) * PAGE]
                    .iter()
                    .zip(&want[page * PAGE..(page + 1) * PAGE])
                    .filter(|(a, b)| a != b)
                    .count();
                bad.push(format!(
                    "{} at {:#x}: byte {at} (page {page}, {wrong} bytes of it) differs",
                    r.kind.name(),
                    r.start
                ));
            }
        }
        bad
    }

    /// Checks that the holes are still unmapped (nothing else was mapped there meanwhile,
    /// which would make the fuzzer's expectations wrong); returns the intruders.
    pub fn holes_still_empty(&self) -> Vec<String> {
        Self::maps()
            .into_iter()
            .filter(|&(a, b, _)| self.holes.iter().any(|h| h.start < b && a < h.end()))
            .map(|(_, _, line)| format!("a hole of the arena is mapped: {line}"))
            .collect()
    }
}

/// The 40 bytes of a command block.
pub fn cmd_bytes(c: &Cmd) -> [u8; 40] {
    let mut b = [0u8; 40];
    for (k, v) in [c.addr, c.ptr, c.npages, c.cpages, c.faults]
        .into_iter()
        .enumerate()
    {
        b[k * 8..k * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// A command block from its 40 bytes.
pub fn cmd_from(b: &[u8]) -> Cmd {
    let word = |k: usize| u64::from_le_bytes(b[k * 8..k * 8 + 8].try_into().unwrap_or_default());
    Cmd {
        addr: word(0),
        ptr: word(1),
        npages: word(2),
        cpages: word(3),
        faults: word(4),
    }
}
