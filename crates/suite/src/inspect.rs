//! What the suite reads from the kernel: dmirror's debugfs counters and refcount check, the pfn
//! probe, `/proc/self/pagemap`, the kernel log, and the module's presence.

use crate::harness::{Config, Fail, Variant, R};
use dmirror_abi::report;
use std::collections::HashMap;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;

const DEBUGFS: &str = "/sys/kernel/debug/dmirror";

/// Parses `key value` lines.
pub fn parse_kv(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// A device's counters, from `dmirror/<device>/stats`.
#[derive(Debug, Clone)]
pub struct Stats(HashMap<String, String>);

impl Stats {
    /// A numeric counter; panics on a missing key (a format change the tests must notice).
    pub fn get(&self, key: &str) -> u64 {
        self.0
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("stats has no numeric '{key}': {:?}", self.0))
    }

    pub fn kind(&self) -> &str {
        self.0.get("kind").map(String::as_str).unwrap_or("")
    }
}

/// Reads the counters of device `v`.
pub fn stats(v: Variant) -> R<Stats> {
    device_stats(v.device())
}

/// Reads the counters of the device named `device` (`hmm_dmirrorN`).
pub fn device_stats(device: &str) -> R<Stats> {
    let path = format!("{DEBUGFS}/{device}/stats");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Fail::Fail(format!("cannot read {path}: {e}")))?;
    Ok(Stats(parse_kv(&text)))
}

/// Runs the refcount check of device `v`: fails with its report unless it says `result ok`.
pub fn check(v: Variant) -> R {
    device_check(v.device())
}

/// Runs the refcount check of the device named `device` (`hmm_dmirrorN`).
pub fn device_check(device: &str) -> R {
    let path = format!("{DEBUGFS}/{device}/check");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Fail::Fail(format!("cannot read {path}: {e}")))?;
    if text.lines().last() == Some("result ok") {
        Ok(())
    } else {
        Err(Fail::Fail(format!("refcount check failed:\n{text}")))
    }
}

/// Asserts the zero-refcount contract on device `v` with nothing in flight: `allocated` pages
/// allocated, all of them mapped, no free page with a reference, the pagemap references
/// matching. Returns the counters.
pub fn settled(v: Variant, allocated: u64) -> R<Stats> {
    settled_device(v.device(), allocated)
}

/// [`settled`] for the device named `device` (`hmm_dmirrorN`), any of the four.
pub fn settled_device(device: &str, allocated: u64) -> R<Stats> {
    let s = device_stats(device)?;
    let a = s.get("allocated");
    if a != allocated
        || s.get("mapped") != a
        || s.get("in_flight") != 0
        || s.get("free") + a != s.get("pages")
        || s.get("free_bad_refcount") != 0
        || s.get("bad_pgmap") != 0
    {
        return Err(Fail::Fail(format!(
            "{device}: expected {allocated} allocated, all mapped, none in flight, no bad page; got {:?}",
            s.0
        )));
    }
    device_check(device)?;
    Ok(s)
}

/// What the pfn probe reports for one page frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub kind: String,
    pub page_refcount: i64,
    pub folio_refcount: i64,
    pub folio_order: u32,
    pub folio_mapped: bool,
}

/// Reads the reference counts of the ZONE_DEVICE page frame `pfn` through `dmirror/pfn`;
/// `None` when no device memory covers it.
pub fn probe(pfn: u64) -> R<Option<Probe>> {
    let path = format!("{DEBUGFS}/pfn");
    std::fs::write(&path, format!("{pfn:#x}"))
        .map_err(|e| Fail::Fail(format!("cannot write {path}: {e}")))?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Fail::Fail(format!("cannot read {path}: {e}")))?;
    let kv = parse_kv(&text);
    let num = |k: &str| -> R<i64> {
        kv.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Fail::Fail(format!("pfn probe without '{k}': {text}")))
    };
    Ok(match kv.get("kind").map(String::as_str) {
        Some("none") => None,
        Some(kind) => Some(Probe {
            kind: kind.to_string(),
            page_refcount: num("page_refcount")?,
            folio_refcount: num("folio_refcount")?,
            folio_order: num("folio_order")? as u32,
            folio_mapped: num("folio_mapped")? != 0,
        }),
        None => return Err(Fail::Fail(format!("pfn probe without 'kind': {text}"))),
    })
}

/// Returns the page frame mapped at `addr` in this process (`/proc/self/pagemap`), if present.
pub fn pfn_of(addr: usize) -> R<Option<u64>> {
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let mut buf = [0u8; 8];
    let off = (addr / 4096 * 8) as i64;
    // SAFETY: Reads 8 bytes into `buf` from an open file.
    let n = unsafe { libc::pread(f.as_raw_fd(), buf.as_mut_ptr().cast(), 8, off) };
    if n != 8 {
        return Err(std::io::Error::last_os_error().into());
    }
    let e = u64::from_le_bytes(buf);
    Ok(if e & (1 << 63) != 0 {
        Some(e & ((1 << 55) - 1))
    } else {
        None
    })
}

/// A reader of the kernel log from a point on, without consuming it (`/dev/kmsg`).
pub struct Kmsg(Option<std::fs::File>);

impl Kmsg {
    pub fn open() -> Self {
        Kmsg(
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("/dev/kmsg")
                .ok(),
        )
    }

    /// Starts from the end of the log.
    pub fn skip_to_end(&mut self) {
        if let Some(f) = &self.0 {
            // SAFETY: Repositions an open descriptor.
            unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
        }
    }

    /// Returns the log lines since the last call (or `skip_to_end`).
    pub fn lines(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let Some(f) = &mut self.0 else {
            return out;
        };
        let mut buf = vec![0u8; 8192];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    // "prio,seq,usec,flags;message\n" then " KEY=value" lines.
                    if let Some((_, msg)) = rec.split_once(';') {
                        if let Some(first) = msg.lines().next() {
                            out.push(first.to_string());
                        }
                    }
                }
                // EPIPE: records were overwritten; go on with the next one.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        out
    }

    /// Returns the report lines since the last call (those the host's dmesg scanner fails
    /// on: [`dmirror_abi::report`]).
    pub fn reports(&mut self) -> Vec<String> {
        self.lines().into_iter().filter(|l| report::is_report(l)).collect()
    }
}

/// Whether dmirror is loaded.
pub fn loaded() -> bool {
    std::fs::read_to_string("/proc/modules")
        .map(|m| m.lines().any(|l| l.starts_with("dmirror ")))
        .unwrap_or(false)
}

/// Loads the dmirror module at `module` with `args`; fails with insmod's message.
pub fn load(module: &str, args: &[String]) -> R {
    let out = Command::new("insmod").arg(module).args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Fail::Fail(format!(
            "insmod {} {}: {}",
            module,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Unloads dmirror; fails with rmmod's message.
pub fn unload() -> R {
    let out = Command::new("rmmod").arg("dmirror").output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Fail::Fail(format!(
            "rmmod dmirror: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Makes sure dmirror is loaded with the standard arguments.
pub fn ensure_loaded(config: &Config) -> R {
    if loaded() {
        return Ok(());
    }
    load(&config.module, &config.args)
}

