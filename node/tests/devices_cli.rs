//! `tessel devices` as a user runs it: the JSON contract and the CPU entry that is always there.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

#[test]
fn devices_json_lists_the_cpu_first() {
    let out = Command::new(env!("CARGO_BIN_EXE_tessel"))
        .args(["devices", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let devices = v["devices"].as_array().unwrap();
    assert!(!devices.is_empty());
    let cpu = &devices[0];
    assert_eq!(cpu["kind"], "cpu");
    assert!(cpu["name"].as_str().unwrap().starts_with("cpu"));
    let total = cpu["memory_total_bytes"].as_u64().unwrap();
    let free = cpu["memory_free_bytes"].as_u64().unwrap();
    assert!(total > 0 && free <= total, "{cpu}");
    assert!(cpu["compute_capability"].is_null());
    // Exactly the contract's keys, for every device; CUDA entries carry "major.minor".
    for d in devices {
        let keys: Vec<&str> = d.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            [
                "compute_capability",
                "kind",
                "memory_free_bytes",
                "memory_total_bytes",
                "name"
            ]
        );
        if d["kind"] == "cuda" {
            let cc = d["compute_capability"].as_str().unwrap();
            assert!(cc.split('.').all(|p| p.parse::<u32>().is_ok()), "{cc}");
        }
    }
    assert!(devices[1..].iter().all(|d| d["kind"] == "cuda"));
}

#[test]
fn devices_human_form_says_why_cuda_is_not_used() {
    let out = Command::new(env!("CARGO_BIN_EXE_tessel"))
        .arg("devices")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().any(|l| l.starts_with("cpu ")), "{text}");
    let has_cuda = text.lines().any(|l| l.starts_with("cuda "));
    assert_eq!(!has_cuda, text.contains("CUDA not used: "), "{text}");
}

/// A command whose output is closed under it (`tessel devices | head -0`) stops quietly with
/// 141, as a program stopped by SIGPIPE does, instead of printing a panic.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_tessel"))
        .arg("devices")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
