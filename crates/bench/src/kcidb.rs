//! The KCIDB export: a run's results as KCIDB I/O data (`kcidb.json`), the format the kernel's
//! CI systems exchange and submit to the common reporting database, in the schema version the
//! pinned `kcidb-io` validates (v5.3).
//!
//! One checkout (Debian's `linux-source-7.3` plus the series of `patches/`, with its patchset
//! hash), one build per kernel that ran (the patched run's flavour, and `stock` when the
//! regression cases ran there too), and one test per result of every suite, at the path
//! `dmirror.<suite>.<case>`: the KTAP results and the judge's own checks (`kernel log clean`,
//! `finished`, ...), with the kernel reports the judge found as the log excerpt of the suite's
//! kernel-log check. The regression cases have the same paths in both builds.
//!
//! Everything comes from what the runs recorded: the judged logs, `run.json` (written by `run`:
//! the QEMU set-up, the kernel command line, the kernel build's compiler, release, flavour and,
//! when `scripts/kernel` recorded them, its start time and duration), and the series' files.
//! What a run did not record is left out, never guessed.

use crate::ktap::{Outcome, TestResult};
use crate::regress::{self, Verdict};
use crate::verdict::{SuiteVerdict, Summary};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The CI system's name, the prefix of every object's ID.
pub const ORIGIN: &str = "dmirror";
/// The schema version written: major, minor.
pub const SCHEMA: (u64, u64) = (5, 3);
/// The export's file in the patched run's directory.
pub const FILE: &str = "kcidb.json";
/// The file in a run's directory where `run` records how the run was made.
pub const RECORD: &str = "run.json";
/// The kernel configuration, copied into a run's directory by `run`.
pub const CONFIG: &str = "kernel.config";
/// Where `scripts/setup` installs `kcidb-io`; `DMIRROR_KCIDB_VENV` names another.
pub const VENV: &str = "/opt/dmirror/kcidb-venv";
/// The variable that overrides [`VENV`].
pub const VENV_ENV: &str = "DMIRROR_KCIDB_VENV";
/// The Debian package whose source the series applies to (`scripts/kernel`).
const BASE_PACKAGE: &str = "linux-source-7.3";
/// The schema's limit on a log excerpt, in characters.
const EXCERPT_MAX: usize = 16384;
/// The kernel reports listed by name in a test's `misc`.
const REPORTS_LISTED: usize = 20;

/// How a run was made, recorded by `run` as `run.json` beside its logs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunRecord {
    /// The guest's plan.
    pub plan: String,
    /// When QEMU started, RFC 3339 UTC.
    pub start_time: String,
    /// Seconds until QEMU exited or was killed.
    pub duration: f64,
    /// Whether the run's timeout killed the guest.
    pub timed_out: bool,
    /// The kernel's flavour (`scripts/kernel`): `default`, `debug` or `stock`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flavour: Option<String>,
    /// The kernel image booted.
    pub kernel_image: String,
    /// The kernel command line.
    pub cmdline: String,
    /// The virtual machine.
    pub qemu: Qemu,
    /// The kernel build the image came from, when it is a build tree.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelBuild>,
}

/// The virtual machine of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Qemu {
    /// The emulator run.
    pub binary: String,
    /// The first line of its `--version`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `-accel`.
    pub accel: String,
    /// `-cpu`.
    pub cpu: String,
    /// `-smp`.
    pub smp: u32,
    /// `-m`.
    pub memory: String,
}

/// A kernel build tree, as `scripts/kernel` left it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KernelBuild {
    /// The build directory (KDIR).
    pub dir: String,
    /// `include/config/kernel.release`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// The C compiler, `CONFIG_CC_VERSION_TEXT`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compiler: Option<String>,
    /// The Rust compiler, `CONFIG_RUSTC_VERSION_TEXT`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rustc: Option<String>,
    /// The build's cache key (`.dmirror-built`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When the build started, RFC 3339 UTC (`.dmirror-build-info`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// How long it took, in seconds (`.dmirror-build-info`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
    /// The version of the Debian source package the tree was unpacked from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_version: Option<String>,
    /// The source tree's commit after the series was applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
}

/// Reads a file of a tree, trimmed; `None` when it is missing or empty.
fn read_trimmed(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// A string option's value in a kernel `.config`.
fn config_string(config: &str, key: &str) -> Option<String> {
    config.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix('=')?;
        let v = v.strip_prefix('"')?.strip_suffix('"')?;
        (!v.is_empty()).then(|| v.replace("\\\"", "\"").replace("\\\\", "\\"))
    })
}

/// The build tree of a kernel image at `KDIR/arch/<arch>/boot/<image>`.
pub fn build_dir(image: &Path) -> Option<PathBuf> {
    let dir = image.ancestors().nth(4)?;
    dir.join(".config").is_file().then(|| dir.to_path_buf())
}

/// What a kernel build tree says about its build.
pub fn kernel_build(dir: &Path) -> KernelBuild {
    let config = std::fs::read_to_string(dir.join(".config")).unwrap_or_default();
    let info = std::fs::read_to_string(dir.join(".dmirror-build-info")).unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::trim)
    };
    // An O= build links its source tree; an in-tree build is its own.
    let source = std::fs::read_link(dir.join("source"))
        .map(|s| dir.join(s))
        .unwrap_or_else(|_| dir.to_path_buf());
    KernelBuild {
        dir: dir.display().to_string(),
        release: read_trimmed(&dir.join("include/config/kernel.release")),
        compiler: config_string(&config, "CONFIG_CC_VERSION_TEXT"),
        rustc: config_string(&config, "CONFIG_RUSTC_VERSION_TEXT"),
        key: read_trimmed(&dir.join(".dmirror-built")),
        start_time: field("start").and_then(|s| s.parse().ok()).map(rfc3339),
        duration: field("duration").and_then(|s| s.parse().ok()),
        base_version: read_trimmed(&source.join(".git/dmirror-base-version")),
        head: read_trimmed(&source.join(".git/dmirror-head")),
    }
}

/// The flavour of a run's kernel: the `dmirror.flavour=` the run passed, else the name of its
/// `scripts/kernel` build directory (`build-<flavour>`).
pub fn flavour(append: &[String], build_dir: Option<&Path>) -> Option<String> {
    append
        .iter()
        .flat_map(|a| a.split_whitespace())
        .find_map(|w| w.strip_prefix("dmirror.flavour="))
        .map(str::to_string)
        .or_else(|| {
            let name = build_dir?.file_name()?.to_str()?;
            name.strip_prefix("build-").map(str::to_string)
        })
        .filter(|f| !f.is_empty())
}

/// Year, month, day, hours, minutes, seconds of a UNIX time, UTC (Howard Hinnant's algorithm).
pub fn civil(secs: u64) -> (i64, u64, u64, u64, u64, u64) {
    let (days, rem) = (secs / 86400, secs % 86400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// A UNIX time as RFC 3339, UTC.
pub fn rfc3339(secs: u64) -> String {
    let (y, m, d, hh, mm, ss) = civil(secs);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

/// An RFC 3339 UTC time as written by [`rfc3339`], back to a UNIX time.
fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86400 + hh * 3600 + mm * 60 + ss).ok()
}

/// SHA-256 (FIPS 180-4).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let mut v = h;
        for i in 0..64 {
            let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
            let ch = (v[4] & v[5]) ^ (!v[4] & v[6]);
            let t1 = v[7]
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
            let maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
            let t2 = s0.wrapping_add(maj);
            v = [
                t1.wrapping_add(t2),
                v[0],
                v[1],
                v[2],
                v[3].wrapping_add(t1),
                v[4],
                v[5],
                v[6],
            ];
        }
        for (a, b) in h.iter_mut().zip(v) {
            *a = a.wrapping_add(b);
        }
    }
    let mut out = [0u8; 32];
    for (o, word) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// One patch of the series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    /// Its file name in `patches/`.
    pub name: String,
    /// The hex SHA-256 of the file.
    pub sha256: String,
    /// Whether the stock kernel has it too: its subject starts with one of [`STOCK_PREFIXES`].
    pub stock: bool,
}

/// The series of `patches/`, in the order `scripts/kernel` applies it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Series {
    pub patches: Vec<Patch>,
}

/// KCIDB's patchset hash: the SHA-256 of the patches' newline-terminated hex SHA-256s, in
/// order (`sha256sum *.patch | cut -c-64 | sha256sum | cut -c-64`); empty for no patch.
pub fn patchset_hash<'a>(patches: impl IntoIterator<Item = &'a Patch>) -> String {
    let list: String = patches
        .into_iter()
        .map(|p| format!("{}\n", p.sha256))
        .collect();
    if list.is_empty() {
        String::new()
    } else {
        hex(&sha256(list.as_bytes()))
    }
}

/// The subjects of the patches the stock kernel has: the Rust abstractions and the test
/// driver's fix, none of the kernel fixes (`scripts/kernel` picks them the same way).
pub const STOCK_PREFIXES: &[&str] = &["rust:", "lib/test_hmm:"];

/// Whether a patch's `Subject:` starts with one of [`STOCK_PREFIXES`] (after a `[PATCH ...]`
/// tag), as `scripts/kernel` picks the stock kernel's patches.
fn is_stock_patch(text: &str) -> bool {
    text.lines().any(|l| {
        let Some(s) = l.strip_prefix("Subject: ") else {
            return false;
        };
        let s = match s.strip_prefix('[') {
            Some(rest) => match rest.split_once("] ") {
                Some((tag, rest)) if tag.starts_with("PATCH") && !tag.contains(']') => rest,
                _ => s,
            },
            None => s,
        };
        STOCK_PREFIXES.iter().any(|p| s.starts_with(p))
    })
}

/// The series' cover letter in `patches/`, which is not a patch to apply.
pub const COVER_LETTER: &str = "0000-cover-letter.patch";

impl Series {
    /// The `*.patch` files of a directory, sorted by name, without the cover letter.
    pub fn read(dir: &Path) -> Result<Series, String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".patch") && n != COVER_LETTER)
            .collect();
        names.sort();
        let mut patches = Vec::new();
        for name in names {
            let bytes = std::fs::read(dir.join(&name)).map_err(|e| format!("{name}: {e}"))?;
            patches.push(Patch {
                sha256: hex(&sha256(&bytes)),
                stock: is_stock_patch(&String::from_utf8_lossy(&bytes)),
                name,
            });
        }
        Ok(Series { patches })
    }

    /// The whole series' patchset hash.
    pub fn hash(&self) -> String {
        patchset_hash(&self.patches)
    }

    /// The patches of the stock kernel.
    pub fn stock(&self) -> impl Iterator<Item = &Patch> {
        self.patches.iter().filter(|p| p.stock)
    }
}

/// One run, as the export reads it.
#[derive(Clone, Debug)]
pub struct Run<'a> {
    /// The name of its results directory (`<stamp>-<plan>`).
    pub name: String,
    /// The judge's verdict on it.
    pub summary: &'a Summary,
    /// The kernel log up to the first suite (the `boot` suite's).
    pub boot_dmesg: String,
    /// Its `run.json`, if it has one.
    pub record: Option<RunRecord>,
    /// Whether its directory holds the kernel configuration ([`CONFIG`]).
    pub has_config: bool,
    /// Each suite's output (its KTAP), by suite name.
    pub outputs: Vec<(String, String)>,
}

/// What the export is asked to do.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The URL at which the `results/` directory is published: log and file links are made
    /// below it. None: the export carries no link, only excerpts.
    pub url_base: Option<String>,
}

/// The kernel's banner, `Linux version <release> (<builder>) (<toolchain>) #...`: the
/// toolchain part.
pub fn banner_toolchain(dmesg: &str) -> Option<String> {
    let line = dmesg
        .lines()
        .find_map(|l| l.split_once("Linux version ").map(|x| x.1))?;
    // The second top-level parenthesised group.
    let mut groups = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in line.char_indices() {
        match c {
            '(' => {
                if depth == 0 {
                    start = i + 1;
                }
                depth += 1;
            }
            ')' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    groups.push(&line[start..i]);
                }
            }
            '#' if depth == 0 => break,
            _ => {}
        }
    }
    groups
        .get(1)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The text after a kernel log line's timestamp.
fn log_text(line: &str) -> &str {
    let t = line.trim_start();
    match t.strip_prefix('[').and_then(|r| r.split_once(']')) {
        Some((_, rest)) => rest.trim_start(),
        None => t,
    }
}

/// The kernel command line the kernel logged at boot.
pub fn boot_cmdline(dmesg: &str) -> Option<String> {
    dmesg
        .lines()
        .find_map(|l| log_text(l).strip_prefix("Command line: "))
        .map(|s| s.trim().to_string())
}

/// The firmware's memory map the kernel logged at boot (`BIOS-e820:` lines).
pub fn boot_memory_map(dmesg: &str) -> Vec<String> {
    dmesg
        .lines()
        .filter_map(|l| log_text(l).strip_prefix("BIOS-e820: "))
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// A KCIDB path component: what the schema allows (`[a-zA-Z0-9_-]`), others as `_`.
pub fn path_component(s: &str) -> String {
    let c: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if c.is_empty() {
        "_".into()
    } else {
        c
    }
}

/// A test's path: `dmirror.<suite>.<case>`, the case's own dots kept as levels.
pub fn test_path(suite: &str, case: &str) -> String {
    let mut path = format!("{ORIGIN}.{}", path_component(suite));
    for part in case.split('.') {
        path.push('.');
        path.push_str(&path_component(part));
    }
    path
}

/// The judge's checks that say a suite did not complete: an error rather than a failure of
/// the code under test.
const INCOMPLETE: &[&str] = &["finished", "ktap output", "guest finished its plan"];
/// The judge's checks that carry the kernel reports of a suite.
const LOG_CHECKS: &[&str] = &[
    "kernel log clean",
    "kernel log report caught",
    "guest finished its plan",
];

/// A test's KCIDB status.
pub fn status(t: &TestResult) -> &'static str {
    match t.outcome {
        Outcome::Pass => "PASS",
        Outcome::Skip => "SKIP",
        Outcome::Crash => "ERROR",
        Outcome::Fail if INCOMPLETE.contains(&t.name.as_str()) => "ERROR",
        Outcome::Fail => "FAIL",
    }
}

/// Cuts a string to at most `max` characters.
fn cut(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The kernel reports of a suite as one log excerpt, within the schema's limit.
fn excerpt(suite: &SuiteVerdict) -> String {
    // Room kept for the line that counts the reports left out.
    const RESERVE: usize = 64;
    let n = suite.findings.len();
    let mut out = String::new();
    let mut used = 0;
    for (i, f) in suite.findings.iter().enumerate() {
        let mut one = format!(
            "--- {} at dmesg line {} ({})\n",
            f.kind, f.line_no, suite.name
        );
        for l in &f.context {
            one.push_str(l);
            one.push('\n');
        }
        // The schema allows no NUL anywhere.
        let one = one.replace('\0', "\\0");
        let len = one.chars().count();
        let room = EXCERPT_MAX - RESERVE - used;
        if len > room {
            let mut left = n - i;
            if out.is_empty() {
                out.push_str(cut(&one, room - 1));
                out.push('\n');
                left -= 1;
            }
            if left > 0 {
                out.push_str(&format!("... {left} more kernel report(s) in dmesg.txt\n"));
            }
            break;
        }
        out.push_str(&one);
        used += len;
    }
    out
}

/// The diagnostic lines a suite printed before a failed test's result line, with that line:
/// the failure's own words (a selftest's assertion, a case's reason).
pub fn failure_excerpt(output: &str, name: &str) -> Option<String> {
    const MAX_LINES: usize = 60;
    let lines: Vec<&str> = output.lines().collect();
    let at = lines.iter().position(|l| {
        let Some(rest) = l.trim_start().strip_prefix("not ok ") else {
            return false;
        };
        let rest = rest
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start();
        let rest = rest.strip_prefix("- ").unwrap_or(rest);
        rest.split(" #").next().map(str::trim) == Some(name)
    })?;
    let first = lines[..at]
        .iter()
        .rposition(|l| !l.trim_start().starts_with('#'))
        .map_or(0, |i| i + 1)
        .max(at.saturating_sub(MAX_LINES));
    let text = lines[first..=at].join("\n").replace('\0', "\\0");
    Some(cut(&text, EXCERPT_MAX).to_string())
}

/// Percent-encodes a URL path segment.
fn url_segment(s: &str) -> String {
    s.bytes().fold(String::new(), |mut out, b| {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
        out
    })
}

/// Builds the export's objects.
struct Export<'a> {
    checkout_id: String,
    options: &'a Options,
}

impl Export<'_> {
    fn url(&self, run: &Run, file: &str) -> Option<String> {
        let base = self.options.url_base.as_deref()?.trim_end_matches('/');
        Some(format!(
            "{base}/{}/{}",
            url_segment(&run.name),
            url_segment(file)
        ))
    }

    fn resource(&self, run: &Run, file: &str) -> Option<Value> {
        Some(json!({ "name": file, "url": self.url(run, file)? }))
    }

    /// The VM the guest suites of a run ran in.
    fn guest_environment(&self, run: &Run) -> Value {
        let mut misc = Map::new();
        misc.insert("run".into(), json!(run.name));
        let mut comment = "QEMU".to_string();
        if let Some(r) = &run.record {
            let q = &r.qemu;
            let accel = q.accel.split(',').next().unwrap_or("");
            comment = format!(
                "QEMU x86_64 ({accel}), {} vCPUs, {} memory",
                q.smp, q.memory
            );
            misc.insert("plan".into(), json!(r.plan));
            misc.insert("qemu".into(), json!(q.binary));
            if let Some(v) = &q.version {
                misc.insert("qemu_version".into(), json!(v));
            }
            misc.insert("accelerator".into(), json!(accel));
            misc.insert("accel".into(), json!(q.accel));
            misc.insert("cpu".into(), json!(q.cpu));
            misc.insert("smp".into(), json!(q.smp));
            misc.insert("memory".into(), json!(q.memory));
        }
        let cmdline = run
            .record
            .as_ref()
            .map(|r| r.cmdline.clone())
            .filter(|c| !c.is_empty())
            .or_else(|| boot_cmdline(&run.boot_dmesg));
        if let Some(c) = cmdline {
            misc.insert("cmdline".into(), json!(c));
        }
        let map = boot_memory_map(&run.boot_dmesg);
        if !map.is_empty() {
            misc.insert("memory_map".into(), json!(map));
        }
        json!({ "comment": comment, "misc": misc })
    }

    /// The host the host suites ran on (against the build's tree).
    fn host_environment(&self, run: &Run) -> Value {
        json!({
            "comment": "the host: built against the kernel's build tree",
            "misc": { "run": run.name, "host": true },
        })
    }

    fn build(
        &self,
        run: &Run,
        role: &str,
        flavour: Option<&str>,
        series: Option<&Series>,
    ) -> Value {
        let id = format!("{}:{}", self.checkout_id, flavour.unwrap_or(role));
        let kernel = run.record.as_ref().and_then(|r| r.kernel.as_ref());
        let mut b = Map::new();
        b.insert("id".into(), json!(id));
        b.insert("checkout_id".into(), json!(self.checkout_id));
        b.insert("origin".into(), json!(ORIGIN));
        // The bench builds and boots x86_64 kernels only (`arch/x86/boot/bzImage`).
        b.insert("architecture".into(), json!("x86_64"));
        if let Some(f) = flavour {
            b.insert("config_name".into(), json!(f));
            b.insert(
                "command".into(),
                json!(format!("KERNEL_FLAVOUR={f} scripts/kernel build")),
            );
        }
        let compiler = kernel
            .and_then(|k| k.compiler.clone())
            .or_else(|| banner_toolchain(&run.boot_dmesg));
        if let Some(c) = compiler {
            b.insert("compiler".into(), json!(c));
        }
        if let Some(t) = kernel.and_then(|k| k.start_time.clone()) {
            b.insert("start_time".into(), json!(t));
        }
        if let Some(d) = kernel.and_then(|k| k.duration) {
            b.insert("duration".into(), json!(d));
        }
        if run.has_config {
            if let Some(u) = self.url(run, CONFIG) {
                b.insert("config_url".into(), json!(u));
            }
        }
        if let Some(r) = self.resource(run, "console.log") {
            b.insert("output_files".into(), json!([r]));
        }
        // It built, and the guest booted it.
        b.insert("status".into(), json!("PASS"));
        let mut comment = match role {
            "stock" => "the stock kernel: the series' rust: and lib/test_hmm: patches, none of its kernel fixes"
                .to_string(),
            _ => "the kernel with the whole series".to_string(),
        };
        let mut misc = Map::new();
        misc.insert("role".into(), json!(role));
        misc.insert("run".into(), json!(run.name));
        if let Some(r) = &run.record {
            misc.insert("plan".into(), json!(r.plan));
        }
        if let Some(rel) = kernel
            .and_then(|k| k.release.clone())
            .or_else(|| run.summary.kernel.clone())
        {
            misc.insert("kernel_release".into(), json!(rel));
        }
        if let Some(k) = kernel {
            if let Some(v) = &k.rustc {
                misc.insert("rustc".into(), json!(v));
            }
            if let Some(v) = &k.key {
                misc.insert("build_key".into(), json!(v));
            }
            if let Some(v) = &k.head {
                misc.insert("source_head".into(), json!(v));
            }
        }
        if let Some(s) = series {
            let applied: Vec<&Patch> = if role == "stock" {
                s.stock().collect()
            } else {
                s.patches.iter().collect()
            };
            comment = format!(
                "{comment} ({} of {} patches)",
                applied.len(),
                s.patches.len()
            );
            misc.insert(
                "patches".into(),
                json!(applied.iter().map(|p| &p.name).collect::<Vec<_>>()),
            );
            misc.insert(
                "patchset_hash".into(),
                json!(patchset_hash(applied.iter().copied())),
            );
        }
        b.insert("comment".into(), json!(comment));
        b.insert("misc".into(), Value::Object(misc));
        Value::Object(b)
    }

    /// The tests of one run, against `build_id`.
    fn tests(&self, run: &Run, build_id: &str, regression: &[(String, Verdict)]) -> Vec<Value> {
        let guest = self.guest_environment(run);
        let host = self.host_environment(run);
        let mut ids = HashSet::new();
        let mut out = Vec::new();
        for suite in &run.summary.suites {
            let log_file = match suite.name.as_str() {
                "boot" => "dmesg.txt".to_string(),
                "bench" => "console.log".to_string(),
                name => format!("{name}.ktap"),
            };
            let log_check = suite
                .tests
                .iter()
                .position(|t| LOG_CHECKS.contains(&t.name.as_str()));
            for (i, t) in suite.tests.iter().enumerate() {
                let path = test_path(&suite.name, &t.name);
                let mut id = format!("{build_id}:{path}");
                let mut n = 1;
                while !ids.insert(id.clone()) {
                    n += 1;
                    id = format!("{build_id}:{path}#{n}");
                }
                let mut o = Map::new();
                o.insert("id".into(), json!(id));
                o.insert("build_id".into(), json!(build_id));
                o.insert("origin".into(), json!(ORIGIN));
                o.insert("path".into(), json!(path));
                o.insert("status".into(), json!(status(t)));
                if !t.note.is_empty() {
                    o.insert("comment".into(), json!(t.note.replace('\0', "\\0")));
                }
                let env = if suite.host { &host } else { &guest };
                o.insert("environment".into(), env.clone());
                if let Some(u) = self.url(run, &log_file) {
                    o.insert("log_url".into(), json!(u));
                }
                let mut misc = Map::new();
                misc.insert("suite".into(), json!(suite.name));
                misc.insert("case".into(), json!(t.name));
                misc.insert("gated".into(), json!(suite.gated));
                if suite.host {
                    misc.insert("host".into(), json!(true));
                }
                if suite.name == regress::SUITE {
                    if let Some((_, v)) = regression.iter().find(|(n, _)| *n == t.name) {
                        let v = match v {
                            Verdict::Fixed => "fixed",
                            Verdict::Skip => "skip",
                            Verdict::Wrong => "wrong",
                        };
                        misc.insert("regression".into(), json!(v));
                    }
                }
                if t.outcome == Outcome::Fail {
                    let output = run
                        .outputs
                        .iter()
                        .find(|(n, _)| *n == suite.name)
                        .map(|(_, o)| o.as_str());
                    if let Some(e) = output.and_then(|o| failure_excerpt(o, &t.name)) {
                        o.insert("log_excerpt".into(), json!(e));
                    }
                }
                if log_check == Some(i) && !suite.findings.is_empty() {
                    o.insert("log_excerpt".into(), json!(excerpt(suite)));
                    misc.insert("kernel_reports".into(), json!(suite.findings.len()));
                    let listed: Vec<Value> = suite
                        .findings
                        .iter()
                        .take(REPORTS_LISTED)
                        .map(|f| json!({ "kind": f.kind, "dmesg_line": f.line_no, "line": f.line }))
                        .collect();
                    misc.insert("reports".into(), json!(listed));
                    if suite.expect_findings {
                        misc.insert("reports_expected".into(), json!(true));
                    }
                    let mut files = Vec::new();
                    files.extend(self.resource(run, "dmesg.txt"));
                    if suite.rc.is_none() {
                        files.extend(self.resource(run, "console.log"));
                    }
                    if !files.is_empty() {
                        o.insert("output_files".into(), json!(files));
                    }
                }
                o.insert("misc".into(), Value::Object(misc));
                out.push(Value::Object(o));
            }
        }
        out
    }
}

/// The end of a run, if it recorded its start and duration.
fn run_end(run: &Run) -> Option<u64> {
    let r = run.record.as_ref()?;
    Some(parse_rfc3339(&r.start_time)? + r.duration.ceil() as u64)
}

/// The KCIDB data of a patched run and, for the regression cases, its stock run.
pub fn export(
    patched: &Run,
    stock: Option<&Run>,
    series: Option<&Series>,
    options: &Options,
) -> Value {
    let e = Export {
        checkout_id: format!("{ORIGIN}:{}", patched.name),
        options,
    };
    let mut checkout = Map::new();
    checkout.insert("id".into(), json!(e.checkout_id));
    checkout.insert("origin".into(), json!(ORIGIN));
    let base = patched
        .record
        .as_ref()
        .and_then(|r| r.kernel.as_ref())
        .and_then(|k| k.base_version.clone());
    let mut comment = match &base {
        Some(v) => format!("Debian {BASE_PACKAGE} {v}"),
        None => format!("Debian {BASE_PACKAGE}"),
    };
    let mut misc = Map::new();
    let mut base_misc = Map::new();
    base_misc.insert("debian_package".into(), json!(BASE_PACKAGE));
    if let Some(v) = &base {
        base_misc.insert("version".into(), json!(v));
    }
    misc.insert("base".into(), Value::Object(base_misc));
    if let Some(s) = series {
        checkout.insert("patchset_hash".into(), json!(s.hash()));
        comment = format!(
            "{comment} with the {} patches of the dmirror series",
            s.patches.len()
        );
        misc.insert(
            "patches".into(),
            json!(s.patches.iter().map(|p| &p.name).collect::<Vec<_>>()),
        );
        if let Some(last) = s.patches.last() {
            misc.insert("series_head".into(), json!(last.name));
        }
    }
    if let Some(k) = &patched.summary.kernel {
        misc.insert("kernel_release".into(), json!(k));
    }
    checkout.insert("comment".into(), json!(comment));
    // The series applied: a kernel was built from it and booted.
    checkout.insert("valid".into(), json!(true));
    if let Some(end) = std::iter::once(patched)
        .chain(stock)
        .map(run_end)
        .collect::<Option<Vec<_>>>()
    {
        if let Some(end) = end.into_iter().max() {
            checkout.insert("origin_tests_finish_time".into(), json!(rfc3339(end)));
        }
    }
    checkout.insert("misc".into(), Value::Object(misc));

    let regression: Vec<(String, Verdict)> = match stock {
        Some(s) => regress::compare(patched.summary, s.summary)
            .into_iter()
            .map(|r| (r.name, r.verdict))
            .collect(),
        None => Vec::new(),
    };
    let mut builds = Vec::new();
    let mut tests = Vec::new();
    let patched_flavour = patched.record.as_ref().and_then(|r| r.flavour.clone());
    let b = e.build(patched, "patched", patched_flavour.as_deref(), series);
    tests.extend(e.tests(patched, b["id"].as_str().unwrap_or_default(), &regression));
    builds.push(b);
    if let Some(s) = stock {
        // `make stock` boots the kernel of the stock flavour.
        let b = e.build(s, "stock", Some("stock"), series);
        tests.extend(e.tests(s, b["id"].as_str().unwrap_or_default(), &regression));
        builds.push(b);
    }
    json!({
        "version": { "major": SCHEMA.0, "minor": SCHEMA.1 },
        "checkouts": [Value::Object(checkout)],
        "builds": builds,
        "tests": tests,
    })
}

/// Counts of an export's objects, and of its tests by status.
pub fn counts(data: &Value) -> String {
    let n = |k: &str| data[k].as_array().map_or(0, Vec::len);
    let mut by: Vec<(String, usize)> = Vec::new();
    for t in data["tests"].as_array().into_iter().flatten() {
        let s = t["status"].as_str().unwrap_or("?").to_string();
        match by.iter_mut().find(|(k, _)| *k == s) {
            Some((_, c)) => *c += 1,
            None => by.push((s, 1)),
        }
    }
    let configs: Vec<&str> = data["builds"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            b["config_name"]
                .as_str()
                .or(b["misc"]["role"].as_str())
                .unwrap_or("?")
        })
        .collect();
    let statuses: Vec<String> = by.iter().map(|(s, c)| format!("{s} {c}")).collect();
    format!(
        "{} checkout, {} builds ({}), {} tests ({})",
        n("checkouts"),
        n("builds"),
        configs.join(", "),
        n("tests"),
        statuses.join(", ")
    )
}

/// The Python program that validates a file with `kcidb-io`'s own schema: exit 0 and one line
/// when it is valid I/O data of the library's current major version, else the reason.
pub const VALIDATE_PY: &str = r#"
import json, sys
from importlib import metadata
import jsonschema
import kcidb_io
schema = kcidb_io.schema.LATEST
lib = "kcidb-io " + metadata.version("kcidb-io")
with open(sys.argv[1]) as f:
    data = json.load(f)
version = schema.get_exactly_compatible(data)
if version is None or version.major != schema.major:
    sys.exit(f"{lib}: version {data.get('version')} is not v{schema.major}.x (its latest is v{schema.major}.{schema.minor})")
try:
    version.validate_exactly(data)
except jsonschema.exceptions.ValidationError as e:
    where = "/".join(str(p) for p in e.absolute_path)
    sys.exit(f"{lib}: invalid at /{where}: {e.message}")
print(f"valid KCIDB I/O v{version.major}.{version.minor} data ({lib}): {schema.count(data)} objects")
"#;

/// The Python of the `kcidb-io` virtual environment, or why there is none.
pub fn validator() -> Result<PathBuf, String> {
    let venv = std::env::var_os(VENV_ENV).map_or_else(|| PathBuf::from(VENV), PathBuf::from);
    let python = venv.join("bin/python3");
    if !python.is_file() {
        return Err(format!(
            "no kcidb-io environment at {} (scripts/setup installs it)",
            venv.display()
        ));
    }
    let probe = Command::new(&python)
        .args(["-c", "import kcidb_io"])
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    if !probe.status.success() {
        return Err(format!(
            "{} cannot import kcidb_io (run scripts/setup): {}",
            python.display(),
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
    }
    Ok(python)
}

/// Validates a KCIDB file with `kcidb-io`: Ok with its verdict line, or Err with the reason.
pub fn validate(python: &Path, file: &Path) -> Result<String, String> {
    let out = Command::new(python)
        .args(["-c", VALIDATE_PY])
        .arg(file)
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(if stderr.is_empty() { stdout } else { stderr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_leaves_out_the_cover_letter() {
        let dir = std::env::temp_dir().join(format!("kcidb-series-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(COVER_LETTER), "Subject: [PATCH 0/2] mm: x\n").unwrap();
        std::fs::write(dir.join("0001-a.patch"), "Subject: [PATCH] mm: a\n").unwrap();
        std::fs::write(dir.join("0002-b.patch"), "Subject: [PATCH] rust: b\n").unwrap();
        let series = Series::read(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let series = series.unwrap();
        let names: Vec<&str> = series.patches.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["0001-a.patch", "0002-b.patch"]);
        assert_eq!(series.stock().count(), 1);
    }

    #[test]
    fn sha256_known_answers() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        let million = vec![b'a'; 1_000_000];
        assert_eq!(
            hex(&sha256(&million)),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    #[test]
    fn patchset_hash_is_kcidbs() {
        // `printf 'a\n' >1.patch; printf 'b\n' >2.patch; sha256sum *.patch | cut -c-64 | sha256sum`
        let p = |name: &str, text: &[u8]| Patch {
            name: name.into(),
            sha256: hex(&sha256(text)),
            stock: false,
        };
        let patches = [p("1.patch", b"a\n"), p("2.patch", b"b\n")];
        let list = format!("{}\n{}\n", patches[0].sha256, patches[1].sha256);
        assert_eq!(patchset_hash(&patches), hex(&sha256(list.as_bytes())));
        assert_eq!(patchset_hash(&[]), "");
    }

    #[test]
    fn stock_patches_by_subject() {
        assert!(is_stock_patch(
            "From 0\nSubject: [PATCH 03/17] rust: mm: add Folio\n"
        ));
        assert!(is_stock_patch("Subject: rust: task: x\n"));
        assert!(!is_stock_patch(
            "Subject: [PATCH 08/17] mm/memremap: take freed\n"
        ));
        assert!(!is_stock_patch("Subject: [PATCH] mm: rust: not first\n"));
        assert!(is_stock_patch(
            "Subject: [PATCH 09/28] lib/test_hmm: make device-coherent mode work\n"
        ));
        assert!(!is_stock_patch(
            "Subject: [PATCH 08/28] selftests/mm: add devdax_unbind\n"
        ));
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
        for t in [0, 951_782_400, 1_798_761_599, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        assert_eq!(parse_rfc3339("2026-01-01 00:00:00"), None);
    }

    #[test]
    fn paths_fit_the_schema() {
        assert_eq!(
            test_path("hmm-tests-c", "hmm.hmm_device_private.open_close"),
            "dmirror.hmm-tests-c.hmm.hmm_device_private.open_close"
        );
        assert_eq!(
            test_path("canary", "kernel log clean"),
            "dmirror.canary.kernel_log_clean"
        );
        assert_eq!(test_path("hmm-tests-c", "#27"), "dmirror.hmm-tests-c._27");
        assert_eq!(test_path("a", "x..y"), "dmirror.a.x._.y");
    }

    #[test]
    fn statuses() {
        let t = |name: &str, outcome| TestResult {
            name: name.into(),
            outcome,
            note: String::new(),
        };
        assert_eq!(status(&t("x", Outcome::Pass)), "PASS");
        assert_eq!(status(&t("x", Outcome::Fail)), "FAIL");
        assert_eq!(status(&t("x", Outcome::Skip)), "SKIP");
        assert_eq!(status(&t("#3", Outcome::Crash)), "ERROR");
        assert_eq!(status(&t("finished", Outcome::Fail)), "ERROR");
        assert_eq!(status(&t("kernel log clean", Outcome::Fail)), "FAIL");
    }

    #[test]
    fn boot_log_facts() {
        let log = "[    0.000000] Linux version 7.3.4-dmirror+ (root@vm) (Debian clang version 19.1.7 (3~deb12u1), Debian LLD 19.1.7) #2 SMP PREEMPT Sun Nov 22 20:45:03 UTC 2026\n\
            [    0.000000] Command line: console=ttyS0 memmap=512M$1536M\n\
            [    0.000000] BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff]  System RAM\n";
        assert_eq!(
            banner_toolchain(log).as_deref(),
            Some("Debian clang version 19.1.7 (3~deb12u1), Debian LLD 19.1.7")
        );
        assert_eq!(
            boot_cmdline(log).as_deref(),
            Some("console=ttyS0 memmap=512M$1536M")
        );
        assert_eq!(
            boot_memory_map(log),
            ["[mem 0x0000000000000000-0x000000000009fbff] System RAM"]
        );
        assert_eq!(banner_toolchain("no banner"), None);
    }

    #[test]
    fn flavour_from_append_or_build_dir() {
        let append = vec!["dmirror.flavour=debug".to_string()];
        assert_eq!(flavour(&append, None).as_deref(), Some("debug"));
        assert_eq!(
            flavour(&[], Some(Path::new("/var/cache/dmirror/build-stock"))).as_deref(),
            Some("stock")
        );
        assert_eq!(flavour(&[], Some(Path::new("/usr/src/linux"))), None);
    }

    #[test]
    fn config_strings() {
        let c = "CONFIG_CC_VERSION_TEXT=\"Debian clang version 22.1.8 (1~deb12u1)\"\nCONFIG_RUSTC_VERSION_TEXT=\"\"\n";
        assert_eq!(
            config_string(c, "CONFIG_CC_VERSION_TEXT").as_deref(),
            Some("Debian clang version 22.1.8 (1~deb12u1)")
        );
        assert_eq!(config_string(c, "CONFIG_RUSTC_VERSION_TEXT"), None);
        assert_eq!(config_string(c, "CONFIG_CC"), None);
    }

    #[test]
    fn failure_excerpts() {
        let ktap = "1..3\nok 1 a\n# RUN b\n# b.c:12: Expected x == y\nnot ok 2 b\n# c: too slow\nnot ok 3 - c # 2.0s\n";
        assert_eq!(
            failure_excerpt(ktap, "b").as_deref(),
            Some("# RUN b\n# b.c:12: Expected x == y\nnot ok 2 b")
        );
        assert_eq!(
            failure_excerpt(ktap, "c").as_deref(),
            Some("# c: too slow\nnot ok 3 - c # 2.0s")
        );
        assert_eq!(failure_excerpt(ktap, "a"), None);
        assert_eq!(
            failure_excerpt("not ok 1 x\n", "x").as_deref(),
            Some("not ok 1 x")
        );
    }

    #[test]
    fn excerpt_stays_within_the_limit() {
        let finding = crate::dmesg::Finding {
            kind: "WARNING".into(),
            line_no: 1,
            line: "WARNING: x".into(),
            context: vec!["y".repeat(300); 16],
        };
        let suite = SuiteVerdict {
            name: "s".into(),
            gated: true,
            host: false,
            expect_findings: false,
            rc: Some(0),
            passed: 0,
            failed: 1,
            skipped: 0,
            tests: Vec::new(),
            findings: vec![finding; 100],
        };
        let e = excerpt(&suite);
        assert!(e.chars().count() <= EXCERPT_MAX);
        assert!(e.starts_with("--- WARNING at dmesg line 1 (s)\n"));
        assert!(
            e.ends_with("more kernel report(s) in dmesg.txt\n"),
            "{}",
            &e[e.len() - 100..]
        );
    }
}
