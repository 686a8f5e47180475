// SPDX-License-Identifier: GPL-2.0

//! Read-only introspection under `/sys/kernel/debug/dmirror/` (root only, as all of debugfs):
//!
//! - `hmm_dmirrorN/stats`: the device's page counters, `key value` per line;
//! - `hmm_dmirrorN/check`: the zero-based refcount check of every chunk;
//! - `pfn`: write a page frame number (decimal or `0x` hex), read the reference counts of that
//!   ZONE_DEVICE page, whichever driver owns it.
//!
//! `docs/driver.md` documents the format; the test suite parses it.

use crate::device::Device;
use core::{
    fmt,
    sync::atomic::{AtomicUsize, Ordering},
};
use kernel::{
    debugfs::{Dir, File},
    mm::memremap::{probe_pfn, MemoryType},
    prelude::*,
    sync::Arc,
    uaccess::UserSliceReader,
};

/// The debugfs entries; removed when dropped.
pub(crate) struct Debugfs {
    _files: KVec<Pin<KBox<File<Arc<Device>>>>>,
    _pfn: Pin<KBox<File<AtomicUsize>>>,
    _dirs: KVec<Dir>,
}

impl Debugfs {
    /// Creates `dmirror/` with a directory for each device in `devices` (named after their
    /// device nodes) and the `pfn` probe.
    pub(crate) fn new(devices: &[(&'static CStr, Arc<Device>)]) -> Result<Self> {
        let root = Dir::new(c"dmirror");
        let mut files = KVec::new();
        let mut dirs = KVec::new();
        for (name, device) in devices {
            let dir = root.subdir(name);
            files.push(
                KBox::pin_init(
                    dir.read_callback_file(c"stats", device.clone(), &|d: &Arc<Device>, f| {
                        d.write_stats(f)
                    }),
                    GFP_KERNEL,
                )?,
                GFP_KERNEL,
            )?;
            files.push(
                KBox::pin_init(
                    dir.read_callback_file(c"check", device.clone(), &|d: &Arc<Device>, f| {
                        d.write_check(f)
                    }),
                    GFP_KERNEL,
                )?,
                GFP_KERNEL,
            )?;
            dirs.push(dir, GFP_KERNEL)?;
        }
        let pfn = KBox::pin_init(
            root.read_write_callback_file(c"pfn", AtomicUsize::new(0), &write_probe, &set_pfn),
            GFP_KERNEL,
        )?;
        dirs.push(root, GFP_KERNEL)?;
        Ok(Self {
            _files: files,
            _pfn: pfn,
            _dirs: dirs,
        })
    }
}

/// Parses a page frame number written to `pfn`: decimal, or hex with a `0x` prefix.
fn parse_pfn(text: &[u8]) -> Result<usize> {
    let text = core::str::from_utf8(text).map_err(|_| EINVAL)?.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => usize::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| EINVAL)
}

fn set_pfn(pfn: &AtomicUsize, reader: &mut UserSliceReader) -> Result {
    let mut buf = [0u8; 32];
    let n = reader.len();
    if n == 0 || n > buf.len() {
        return Err(EINVAL);
    }
    reader.read_slice(&mut buf[..n])?;
    pfn.store(parse_pfn(&buf[..n])?, Ordering::Relaxed);
    Ok(())
}

fn write_probe(pfn: &AtomicUsize, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let pfn = pfn.load(Ordering::Relaxed);
    writeln!(f, "pfn {pfn:#x}")?;
    let Some(p) = probe_pfn(pfn) else {
        return writeln!(f, "kind none");
    };
    let kind = match p.kind {
        MemoryType::Private => "private",
        MemoryType::Coherent => "coherent",
        MemoryType::FsDax => "fsdax",
        MemoryType::Generic => "generic",
        MemoryType::P2pDma => "p2pdma",
        MemoryType::Other(_) => "other",
    };
    writeln!(f, "kind {kind}")?;
    writeln!(f, "page_refcount {}", p.page_refcount)?;
    writeln!(f, "folio_refcount {}", p.folio_refcount)?;
    writeln!(f, "folio_order {}", p.folio_order)?;
    writeln!(f, "folio_mapped {}", u8::from(p.folio_mapped))
}
