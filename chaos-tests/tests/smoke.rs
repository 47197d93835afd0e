//! A short smoke of the chaos harness through its binary: two scenarios against real NATS
//! servers and real `tessel node`s, each of which must report nothing lost, nothing doubled and
//! something acknowledged.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::process::Command;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chaos-tests"))
}

/// The `tessel` binary next to the harness's, built if it is not there yet.
fn tessel() -> PathBuf {
    let path = bin().parent().unwrap().join("tessel");
    if !path.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "node", "--bin", "tessel"])
            .status()
            .unwrap();
        assert!(status.success(), "building tessel failed");
    }
    path
}

fn run(scenario: &str, seed: u64) -> serde_json::Value {
    let dir = std::env::temp_dir().join(format!("chaos-smoke-{scenario}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("report.json");
    let out = Command::new(bin())
        .args([
            "--scenario",
            scenario,
            "--seed",
            &seed.to_string(),
            "--duration",
            "15s",
        ])
        .arg("--json")
        .arg(&json)
        .arg("--tessel")
        .arg(tessel())
        .arg("--dir")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{scenario} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    report
}

fn assert_clean(r: &serde_json::Value) {
    assert_eq!(r["lost"], 0, "{r:#}");
    assert_eq!(r["doubled"], 0, "{r:#}");
    assert!(r["acked"].as_u64().unwrap() > 0, "{r:#}");
    assert!(!r["faults"].as_array().unwrap().is_empty(), "{r:#}");
    assert_eq!(r["leaders_per_term_ok"], true, "{r:#}");
    assert!(r["max_unavailable_ms"].is_u64(), "{r:#}");
}

#[test]
fn list_names_every_scenario() {
    let out = Command::new(bin()).arg("--list").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for s in [
        "leader-kill",
        "node-kill",
        "pause",
        "nats-restart",
        "partition-one",
        "partition-minority",
        "links",
        "clock-skew",
        "mixed",
    ] {
        assert!(text.contains(s), "{s} missing from:\n{text}");
    }
}

#[test]
fn an_unknown_scenario_is_refused() {
    let out = Command::new(bin())
        .args(["--scenario", "no-such-thing"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn leader_kill_and_pause_lose_and_double_nothing() {
    // One test, so that the two runs do not compete for the CPUs.
    let r = run("leader-kill", 1);
    assert_clean(&r);
    assert_eq!(r["scenario"], "leader-kill");
    let r = run("pause", 2);
    assert_clean(&r);
    assert_eq!(r["scenario"], "pause");
}
