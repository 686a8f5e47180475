//! What the runner and its suites ask of the guest: the kernel command line, the kernel log,
//! the memory state, modules, and programs run under a time limit with their output streamed.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// The value of `name=` on the kernel command line (the last one given), if any.
pub fn arg(name: &str) -> Option<String> {
    let cmdline = fs::read_to_string("/proc/cmdline").ok()?;
    let prefix = format!("{name}=");
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(&prefix))
        .next_back()
        .map(str::to_owned)
}

/// The words of `dmirror.NAME=a,b,c` (split at `sep`), for a program's arguments.
pub fn arg_words(name: &str, sep: char) -> Vec<String> {
    arg(name)
        .map(|v| {
            v.split(sep)
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Puts one line into the kernel log.
pub fn kmsg(line: &str) {
    // One write, one record. A failed write loses a timing mark, nothing the verdict needs.
    if let Ok(mut f) = fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Writes `value` into a file of /proc or /sys.
pub fn write_file(path: &str, value: &str) -> io::Result<()> {
    fs::write(path, value)
}

/// Seconds since boot.
pub fn uptime() -> u64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split('.').next()?.parse().ok())
        .unwrap_or(0)
}

/// The memory state, for the kernel log: free and available memory (and how much of it is in
/// blocks a huge page can take at once), then cumulative counters of /proc/vmstat (direct
/// reclaim and compaction stalls, pages compaction scanned, huge page faults that were served
/// or fell back).
pub fn memstate() -> String {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    // Free blocks of 2 MiB or more (orders 9 and 10, after "Node N, zone NAME").
    let blocks: u64 = fs::read_to_string("/proc/buddyinfo")
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let n: Vec<u64> = l
                .split_whitespace()
                .skip(4)
                .filter_map(|w| w.parse().ok())
                .collect();
            n.get(9).copied().unwrap_or(0) + 2 * n.get(10).copied().unwrap_or(0)
        })
        .sum();
    let (mut stalls, mut counters) = (0u64, String::new());
    for l in fs::read_to_string("/proc/vmstat").unwrap_or_default().lines() {
        let Some((key, value)) = l.split_once(' ') else {
            continue;
        };
        if key.starts_with("allocstall_") {
            stalls += value.parse::<u64>().unwrap_or(0);
        } else if matches!(
            key,
            "compact_stall"
                | "compact_fail"
                | "compact_success"
                | "compact_migrate_scanned"
                | "thp_fault_alloc"
                | "thp_fault_fallback"
        ) {
            counters += &format!(", {key} {value}");
        }
    }
    format!(
        "free {} MiB, available {} MiB ({} MiB in free 2 MiB blocks){counters}, allocstall {stalls}",
        kib("MemFree:") / 1024,
        kib("MemAvailable:") / 1024,
        2 * blocks
    )
}

/// Whether module `name` is loaded.
pub fn loaded(name: &str) -> bool {
    let prefix = format!("{name} ");
    fs::read_to_string("/proc/modules").is_ok_and(|m| m.lines().any(|l| l.starts_with(&prefix)))
}

/// The output (standard output and error, in that order) and success of a short command.
pub fn output<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> (bool, String) {
    match Command::new(program).args(args).stdin(Stdio::null()).output() {
        Ok(out) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text += &String::from_utf8_lossy(&out.stderr);
            (out.status.success(), text)
        }
        Err(e) => (false, format!("{program}: {e}\n")),
    }
}

/// Runs `program` with `args` and this process's standard output; its exit status as the shell
/// gives it, 1 (said on standard output) when it cannot start.
pub fn run<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> i32 {
    match Command::new(program).args(args).status() {
        Ok(s) => shell_status(s),
        Err(e) => {
            println!("# {program}: {e}");
            1
        }
    }
}

/// Loads `/lib/modules/NAME.ko` with `args`; on failure, what insmod said.
pub fn insmod(name: &str, args: &[String]) -> Result<(), String> {
    let mut all = vec![format!("/lib/modules/{name}.ko")];
    all.extend_from_slice(args);
    match output("insmod", &all) {
        (true, _) => Ok(()),
        (false, text) => Err(text),
    }
}

/// Unloads module `name`; on failure, what rmmod said.
pub fn rmmod(name: &str) -> Result<(), String> {
    match output("rmmod", &[name]) {
        (true, _) => Ok(()),
        (false, text) => Err(text),
    }
}

/// The kernel log; `clear` empties it after reading (the runner gives each suite the log it
/// caused).
pub fn dmesg(clear: bool) -> String {
    output("dmesg", if clear { &["-c"][..] } else { &[] }).1
}

/// A program's exit status as the shell gives it: its exit code, or 128 + the signal that
/// killed it.
pub fn shell_status(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// The status a run killed at its time limit gets (what `timeout -s KILL` gives).
pub const KILLED: i32 = 128 + libc::SIGKILL;

/// Spawns `cmd` in a process group of its own, so that a time limit ends it with everything
/// it started.
pub fn spawn_group(cmd: &mut Command) -> io::Result<Child> {
    cmd.process_group(0).spawn()
}

/// Waits for `child` (the leader of its process group) for at most `limit`; past it, kills the
/// whole group. Returns the shell's exit status, [`KILLED`] for a kill.
pub fn wait_limited(mut child: Child, limit: Duration) -> i32 {
    let pid = child.id();
    let (done, waiting) = mpsc::channel::<()>();
    let killer = thread::spawn(move || {
        if waiting.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
            // SAFETY: kill() takes any process group id; at worst it finds none.
            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
            true
        } else {
            false
        }
    });
    let status = child.wait();
    let _ = done.send(());
    let killed = killer.join().unwrap_or(false);
    match status {
        _ if killed => KILLED,
        Ok(s) => shell_status(s),
        Err(_) => 1,
    }
}

/// Runs `cmd` for at most `limit`, its standard output and error merged and handed line by line
/// to `line` as they come (so that a crash later loses none). Returns the shell's exit status.
pub fn run_lines(cmd: &mut Command, limit: Duration, mut line: impl FnMut(&str)) -> i32 {
    let (reader, writer) = match io::pipe() {
        Ok(p) => p,
        Err(e) => {
            line(&format!("# pipe: {e}"));
            return 1;
        }
    };
    let child = match writer.try_clone() {
        Ok(w2) => spawn_group(cmd.stdin(Stdio::null()).stdout(w2).stderr(writer)),
        Err(e) => Err(e),
    };
    // The child holds the write ends now; the reader sees the end of the output when it exits.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            line(&format!("# {:?}: {e}", cmd.get_program()));
            return 1;
        }
    };
    let (status_tx, status_rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let _ = status_tx.send(wait_limited(child, limit));
    });
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
        let text = String::from_utf8_lossy(&buf);
        line(text.trim_end_matches('\n'));
        buf.clear();
    }
    let _ = waiter.join();
    status_rx.recv().unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, limit: Duration) -> (i32, Vec<String>) {
        let mut lines = Vec::new();
        let rc = run_lines(Command::new("sh").args(["-c", script]), limit, |l| {
            lines.push(l.to_owned())
        });
        (rc, lines)
    }

    #[test]
    fn a_program_s_lines_and_status_come_back() {
        let (rc, lines) = sh(
            "echo one; echo two >&2; printf three; exit 3",
            Duration::from_secs(20),
        );
        assert_eq!(
            (rc, lines),
            (3, vec!["one".to_owned(), "two".to_owned(), "three".to_owned()])
        );
    }

    #[test]
    fn a_time_limit_kills_the_whole_group() {
        // The child shell's own child keeps the pipe open: only a kill of the group ends the
        // output.
        let t = std::time::Instant::now();
        let (rc, lines) = sh(
            "echo started; sleep 30 & sleep 30; echo never",
            Duration::from_millis(500),
        );
        assert_eq!((rc, lines), (KILLED, vec!["started".to_owned()]));
        assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    }

    #[test]
    fn a_signal_is_128_plus_its_number() {
        let (rc, _) = sh("kill -TERM $$", Duration::from_secs(20));
        assert_eq!(rc, 128 + libc::SIGTERM);
    }
}
