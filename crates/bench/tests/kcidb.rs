//! The KCIDB export of captured runs (a green run, a failing one, one whose guest crashed, and a
//! patched run with its stock run), checked by structure here and validated by `kcidb-io`'s
//! own schema when `scripts/setup` has installed it; without it each validation says SKIP with
//! the reason.

use dmirror_bench::kcidb;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The patchset hash of `tests/data/patches`, by KCIDB's own recipe:
/// `sha256sum *.patch | cut -c-64 | sha256sum | cut -c-64`.
const SERIES_HASH: &str = "f763cb09bd79ae1203dad68ebf2816f5cebf97c11d4f09275eaea9a75ee32da2";
/// The same over its `rust:` patches only (0001 and 0017): the stock kernel's.
const STOCK_HASH: &str = "acb5f3ee8617dff527c0090a65ddfa9b04f0659f200df328276ff52923070b7a";

fn data(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(case)
}

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dmirror-kcidb-{test}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies a captured run into `tmp/name`, as a results directory of that name.
fn results(tmp: &Path, case: &str, name: &str) -> PathBuf {
    let dir = tmp.join(name);
    fs::create_dir_all(&dir).unwrap();
    for e in fs::read_dir(data(case)).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

/// Runs `dmirror-bench kcidb DIR ARGS...`; returns its exit code, what it printed and the
/// export.
fn export(dir: &Path, args: &[&str]) -> (i32, String, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_dmirror-bench"))
        .arg("kcidb")
        .arg(dir)
        .arg("--patches")
        .arg(data("patches"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = fs::read_to_string(dir.join(kcidb::FILE))
        .unwrap_or_else(|e| panic!("no kcidb.json ({e}): {stdout}{stderr}"));
    (
        out.status.code().unwrap_or(-1),
        stdout,
        serde_json::from_str(&text).unwrap(),
    )
}

/// Says SKIP on the test's stderr, past the harness's capture, so that it shows in every run.
fn skip(what: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP: {what}: {why}");
}

/// Validates an export with `kcidb-io`: asserts it is valid, or says SKIP when the validator
/// is not installed. Returns whether it validated.
fn validate(what: &str, file: &Path) -> bool {
    match kcidb::validator() {
        Err(why) => {
            skip(&format!("kcidb-io validation of {what}"), &why);
            false
        }
        Ok(python) => {
            let verdict = kcidb::validate(&python, file).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(verdict.starts_with("valid KCIDB I/O v5."), "{verdict}");
            let _ = writeln!(std::io::stderr(), "kcidb-io: {what}: {verdict}");
            true
        }
    }
}

fn list<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key].as_array().unwrap_or_else(|| panic!("no {key} list"))
}

fn test<'a>(v: &'a Value, path: &str) -> &'a Value {
    list(v, "tests")
        .iter()
        .find(|t| t["path"] == path)
        .unwrap_or_else(|| panic!("no test {path}"))
}

fn count(v: &Value, status: &str) -> usize {
    list(v, "tests")
        .iter()
        .filter(|t| t["status"] == status)
        .count()
}

/// What every export holds: the version, one checkout, builds of it, tests of those builds,
/// every test's path under `dmirror.` and unique IDs.
fn check_structure(v: &Value, builds: usize) {
    assert_eq!(v["version"]["major"], 5);
    let checkouts = list(v, "checkouts");
    assert_eq!(checkouts.len(), 1);
    let checkout = &checkouts[0];
    assert_eq!(checkout["origin"], "dmirror");
    assert_eq!(checkout["patchset_hash"], SERIES_HASH);
    assert_eq!(checkout["valid"], true);
    assert_eq!(list(v, "builds").len(), builds);
    let build_ids: BTreeSet<&str> = list(v, "builds")
        .iter()
        .map(|b| {
            assert_eq!(b["checkout_id"], checkout["id"]);
            assert_eq!(b["status"], "PASS");
            b["id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(build_ids.len(), builds);
    let mut ids = BTreeSet::new();
    for t in list(v, "tests") {
        assert!(build_ids.contains(t["build_id"].as_str().unwrap()), "{t}");
        assert!(t["path"].as_str().unwrap().starts_with("dmirror."), "{t}");
        assert!(
            ids.insert(t["id"].as_str().unwrap()),
            "duplicate id {}",
            t["id"]
        );
        assert!(
            ["PASS", "FAIL", "SKIP", "ERROR"].contains(&t["status"].as_str().unwrap()),
            "{t}"
        );
    }
}

#[test]
fn green_run() {
    let tmp = scratch("green");
    let dir = results(&tmp, "good", "20261122-204503-test");
    let (code, out, v) = export(&dir, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("1 checkout, 1 builds (patched), 9 tests (PASS 9)"),
        "{out}"
    );
    check_structure(&v, 1);
    assert_eq!(list(&v, "tests").len(), 9);
    assert_eq!(count(&v, "PASS"), 9);
    assert_eq!(v["checkouts"][0]["id"], "dmirror:20261122-204503-test");
    // No run.json: no flavour, the compiler from the kernel's banner.
    let build = &v["builds"][0];
    assert_eq!(build["id"], "dmirror:20261122-204503-test:patched");
    assert!(build.get("config_name").is_none());
    assert_eq!(
        build["compiler"],
        "Debian clang version 19.1.7 (3~deb12u1), Debian LLD 19.1.7"
    );
    assert!(build.get("duration").is_none());
    // The canary's warning, caught as expected, is its log check's excerpt.
    let caught = test(&v, "dmirror.canary.kernel_log_report_caught");
    assert_eq!(caught["status"], "PASS");
    assert!(caught["log_excerpt"]
        .as_str()
        .unwrap()
        .contains("WARNING: bench_canary.rs:28"));
    assert_eq!(caught["misc"]["reports_expected"], true);
    let load = test(&v, "dmirror.dmirror-load.insmod");
    let env = &load["environment"];
    assert_eq!(env["comment"], "QEMU");
    assert!(env["misc"]["cmdline"]
        .as_str()
        .unwrap()
        .contains("dmirror.plan=test"));
    assert!(env["misc"].get("accelerator").is_none());
    assert!(!env["misc"]["memory_map"].as_array().unwrap().is_empty());
    // No URL base: no links.
    assert!(list(&v, "tests").iter().all(|t| t.get("log_url").is_none()));
    validate("the green run", &dir.join(kcidb::FILE));
    fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn failing_run() {
    let tmp = scratch("failing");
    let dir = results(&tmp, "failing", "20261122-210000-test");
    let (code, out, v) = export(&dir, &[]);
    assert_eq!(code, 0, "{out}");
    check_structure(&v, 1);
    assert_eq!(list(&v, "tests").len(), 80);
    assert_eq!((count(&v, "PASS"), count(&v, "FAIL")), (70, 10));
    let t = test(
        &v,
        "dmirror.hmm-tests-c.hmm.hmm_device_coherent.migrate_multiple",
    );
    assert_eq!(t["status"], "FAIL");
    assert_eq!(
        t["misc"]["case"],
        "hmm.hmm_device_coherent.migrate_multiple"
    );
    assert!(t["log_excerpt"]
        .as_str()
        .unwrap()
        .contains("migrate_multiple:Expected buffer->cpages (0) == npages (1024)"));
    let log = test(&v, "dmirror.hmm-tests-c.kernel_log_clean");
    assert_eq!(log["status"], "FAIL");
    assert_eq!(log["misc"]["kernel_reports"], 4);
    let excerpt = log["log_excerpt"].as_str().unwrap();
    assert!(excerpt.contains("NULL pointer dereference"), "{excerpt}");
    assert!(excerpt.chars().count() <= 16384);
    validate("the failing run", &dir.join(kcidb::FILE));
    fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn crashed_run() {
    let tmp = scratch("crashed");
    let dir = results(&tmp, "crashed", "20261122-220000-test");
    let (code, out, v) = export(&dir, &[]);
    assert_eq!(code, 0, "{out}");
    check_structure(&v, 1);
    // 26 results that never came, the suite that never finished, the plan never done.
    assert_eq!(count(&v, "ERROR"), 28);
    assert_eq!(test(&v, "dmirror.hmm-tests-c._78")["status"], "ERROR");
    assert_eq!(test(&v, "dmirror.hmm-tests-c.finished")["status"], "ERROR");
    let plan = test(&v, "dmirror.bench.guest_finished_its_plan");
    assert_eq!(plan["status"], "ERROR");
    assert!(plan["log_excerpt"]
        .as_str()
        .unwrap()
        .contains("BUG: kernel NULL pointer dereference"));
    let log = test(&v, "dmirror.hmm-tests-c.kernel_log_clean");
    assert_eq!(log["status"], "FAIL");
    assert!(log["log_excerpt"]
        .as_str()
        .unwrap()
        .contains("dmirror_migrate_to_device"));
    validate("the crashed run", &dir.join(kcidb::FILE));
    fs::remove_dir_all(&tmp).unwrap();
}

/// The regression cases' paths in one build.
fn regress_paths<'a>(v: &'a Value, build: &str) -> BTreeSet<&'a str> {
    list(v, "tests")
        .iter()
        .filter(|t| t["build_id"] == build && t["misc"]["suite"] == "dmirror-regress")
        .filter(|t| t["misc"].get("regression").is_some())
        .map(|t| t["path"].as_str().unwrap())
        .collect()
}

#[test]
fn patched_and_stock_runs_are_two_builds_of_one_checkout() {
    let tmp = scratch("pair");
    let patched = results(&tmp, "regress-test", "20261123-091402-test");
    fs::write(patched.join(kcidb::CONFIG), "CONFIG_RUST=y\n").unwrap();
    let stock = results(&tmp, "regress-stock", "20261123-091731-stock");
    let (code, out, v) = export(
        &patched,
        &[
            "--stock",
            stock.to_str().unwrap(),
            "--url-base",
            "https://ci.example.org/42/results/",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 builds (default, stock)"), "{out}");
    check_structure(&v, 2);
    let checkout = &v["checkouts"][0];
    assert_eq!(checkout["id"], "dmirror:20261123-091402-test");
    assert_eq!(
        checkout["comment"],
        "Debian linux-source-7.3 7.3.4-1~bpo13+1 with the 3 patches of the dmirror series"
    );
    assert_eq!(checkout["origin_tests_finish_time"], "2026-11-23T09:17:35Z");
    let (p, s) = (&v["builds"][0], &v["builds"][1]);
    assert_eq!(
        (p["id"].as_str(), s["id"].as_str()),
        (
            Some("dmirror:20261123-091402-test:default"),
            Some("dmirror:20261123-091402-test:stock")
        )
    );
    assert_eq!(
        (p["config_name"].as_str(), s["config_name"].as_str()),
        (Some("default"), Some("stock"))
    );
    assert_eq!(p["compiler"], "Debian clang version 19.1.7 (3~deb12u1)");
    assert_eq!(p["duration"].as_f64(), Some(486.0));
    assert_eq!(p["start_time"], "2026-11-23T08:58:40Z");
    assert!(s.get("duration").is_none(), "the stock build recorded none");
    assert_eq!(p["misc"]["patchset_hash"], SERIES_HASH);
    assert_eq!(s["misc"]["patchset_hash"], STOCK_HASH);
    assert_eq!(s["misc"]["patches"].as_array().unwrap().len(), 2);
    assert_eq!(
        p["config_url"],
        "https://ci.example.org/42/results/20261123-091402-test/kernel.config"
    );
    assert!(
        s.get("config_url").is_none(),
        "the stock run has no kernel.config"
    );
    // 1 boot + 3 cases + log check + 2 compile-fail cases; the stock run: 1 + 3 + 1.
    let in_build = |b: &Value| {
        list(&v, "tests")
            .iter()
            .filter(|t| t["build_id"] == b["id"])
            .count()
    };
    assert_eq!((in_build(p), in_build(s)), (7, 5));
    // The same regression paths in both builds: passing patched, failing on stock.
    let paths = regress_paths(&v, p["id"].as_str().unwrap());
    assert_eq!(paths.len(), 3);
    assert_eq!(paths, regress_paths(&v, s["id"].as_str().unwrap()));
    let case = |build: &Value, path: &str| -> Value {
        list(&v, "tests")
            .iter()
            .find(|t| t["build_id"] == build["id"] && t["path"] == path)
            .cloned()
            .unwrap_or_else(|| panic!("no {path} in {}", build["id"]))
    };
    let fixed = "dmirror.dmirror-regress.devdax.free_page_refcount_zero";
    assert_eq!(
        (
            case(p, fixed)["status"].as_str(),
            case(s, fixed)["status"].as_str()
        ),
        (Some("PASS"), Some("FAIL"))
    );
    assert_eq!(case(p, fixed)["misc"]["regression"], "fixed");
    let why = case(s, fixed)["log_excerpt"].as_str().unwrap().to_string();
    assert!(
        why.ends_with(
            "# refcount of a free device-DAX page: 1 != 0\nnot ok 2 devdax.free_page_refcount_zero"
        ),
        "{why}"
    );
    let skipped = "dmirror.dmirror-regress.dmirror.split_coherent_thp_keeps_pgmap";
    assert_eq!(case(s, skipped)["status"], "SKIP");
    assert_eq!(case(s, skipped)["misc"]["regression"], "skip");
    // The guest's environment from run.json; the compile-fail cases ran on the host.
    let env = &case(p, fixed)["environment"];
    assert_eq!(env["misc"]["accelerator"], "tcg");
    assert_eq!(env["misc"]["memory"], "3G");
    assert_eq!(env["comment"], "QEMU x86_64 (tcg), 2 vCPUs, 3G memory");
    assert!(env["misc"]["cmdline"]
        .as_str()
        .unwrap()
        .ends_with("dmirror.flavour=default"));
    let cf = case(p, "dmirror.compile-fail.device_folio_read");
    assert_eq!(cf["environment"]["misc"]["host"], true);
    assert_eq!(
        cf["log_url"],
        "https://ci.example.org/42/results/20261123-091402-test/compile-fail.ktap"
    );
    assert_eq!(
        case(s, fixed)["log_url"],
        "https://ci.example.org/42/results/20261123-091731-stock/dmirror-regress.ktap"
    );
    validate("the patched and stock runs", &patched.join(kcidb::FILE));
    fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn an_older_stock_run_is_left_out() {
    let tmp = scratch("older");
    let patched = results(&tmp, "regress-test", "20261123-091402-test");
    let stock = results(&tmp, "regress-stock", "20261120-080000-stock");
    let (code, out, v) = export(&patched, &["--stock", stock.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("not its stock run, left out"), "{out}");
    check_structure(&v, 1);
    // Without the stock run, no regression verdict.
    assert!(regress_paths(&v, v["builds"][0]["id"].as_str().unwrap()).is_empty());
    fs::remove_dir_all(&tmp).unwrap();
}

/// The validator is no rubber stamp: an export it must refuse is refused, and the command
/// fails on it.
#[test]
fn invalid_data_is_refused() {
    let Ok(python) = kcidb::validator() else {
        skip(
            "kcidb-io refusing invalid data",
            &kcidb::validator().unwrap_err(),
        );
        return;
    };
    let tmp = scratch("invalid");
    let dir = results(&tmp, "good", "20261122-204503-test");
    let (_, _, mut v) = export(&dir, &[]);
    v["tests"][0]["status"] = "BROKEN".into();
    let file = tmp.join("broken.json");
    fs::write(&file, v.to_string()).unwrap();
    let err = kcidb::validate(&python, &file).unwrap_err();
    assert!(err.contains("invalid at /tests/0/status"), "{err}");
    v["tests"][0]["status"] = "PASS".into();
    v["tests"][0]["path"] = "dmirror.kernel log clean".into();
    fs::write(&file, v.to_string()).unwrap();
    assert!(kcidb::validate(&python, &file)
        .unwrap_err()
        .contains("/tests/0/path"));
    fs::remove_dir_all(&tmp).unwrap();
}

/// The patchset hashes above are what KCIDB's shell recipe gives.
#[test]
fn patchset_hash_matches_the_shell_recipe() {
    let series = kcidb::Series::read(&data("patches")).unwrap();
    assert_eq!(series.hash(), SERIES_HASH);
    assert_eq!(kcidb::patchset_hash(series.stock()), STOCK_HASH);
    let shell = Command::new("sh")
        .arg("-c")
        .arg("sha256sum *.patch | cut -c-64 | sha256sum | cut -c-64")
        .current_dir(data("patches"))
        .output();
    match shell {
        Ok(out) if out.status.success() => {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), SERIES_HASH)
        }
        _ => skip(
            "the shell recipe of the patchset hash",
            "no sh or sha256sum",
        ),
    }
}

/// What `run` records of a kernel build tree as `scripts/kernel` leaves it.
#[test]
fn kernel_build_tree_is_read_as_recorded() {
    let tmp = scratch("tree");
    let src = tmp.join("src");
    let build = tmp.join("build-debug");
    fs::create_dir_all(src.join(".git")).unwrap();
    fs::create_dir_all(build.join("include/config")).unwrap();
    fs::create_dir_all(build.join("arch/x86/boot")).unwrap();
    fs::write(src.join(".git/dmirror-base-version"), "7.3.4-1~bpo13+1").unwrap();
    fs::write(
        src.join(".git/dmirror-head"),
        "7d9a82cf9f3b2fb569a3e816042cac6e8b942ecf\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(&src, build.join("source")).unwrap();
    fs::write(
        build.join(".config"),
        "CONFIG_CC_VERSION_TEXT=\"Debian clang version 22.1.8 (1~deb12u1)\"\nCONFIG_RUSTC_VERSION_TEXT=\"rustc 1.96.0\"\n",
    )
    .unwrap();
    fs::write(
        build.join("include/config/kernel.release"),
        "7.3.4-dmirror+\n",
    )
    .unwrap();
    fs::write(build.join(".dmirror-built"), "aaaa6bdc24da5375\n").unwrap();
    fs::write(
        build.join(".dmirror-build-info"),
        "start=1796428800\nduration=553\n",
    )
    .unwrap();
    let image = build.join("arch/x86/boot/bzImage");
    let dir = kcidb::build_dir(&image).unwrap();
    assert_eq!(dir, build);
    let k = kcidb::kernel_build(&dir);
    assert_eq!(k.release.as_deref(), Some("7.3.4-dmirror+"));
    assert_eq!(
        k.compiler.as_deref(),
        Some("Debian clang version 22.1.8 (1~deb12u1)")
    );
    assert_eq!(k.rustc.as_deref(), Some("rustc 1.96.0"));
    assert_eq!(k.key.as_deref(), Some("aaaa6bdc24da5375"));
    assert_eq!(k.start_time.as_deref(), Some("2026-12-05T00:00:00Z"));
    assert_eq!(k.duration, Some(553.0));
    assert_eq!(k.base_version.as_deref(), Some("7.3.4-1~bpo13+1"));
    assert_eq!(
        k.head.as_deref(),
        Some("7d9a82cf9f3b2fb569a3e816042cac6e8b942ecf")
    );
    assert_eq!(kcidb::flavour(&[], Some(&dir)).as_deref(), Some("debug"));
    // Without the build's record, no time: nothing is made up.
    fs::remove_file(build.join(".dmirror-build-info")).unwrap();
    let k = kcidb::kernel_build(&dir);
    assert_eq!((k.start_time, k.duration), (None, None));
    assert_eq!(kcidb::build_dir(&tmp.join("bzImage")), None);
    fs::remove_dir_all(&tmp).unwrap();
}
