//! `tessel sim` as a user runs it: exit codes, the last line, JSON, replay of a failing seed.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::{Command, Output};

fn tessel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessel"))
        .args(args)
        .output()
        .unwrap()
}

fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_clean_range_ends_with_the_summary_line() {
    let out = tessel(&["sim", "--seeds", "20", "--first-seed", "100"]);
    assert!(out.status.success(), "{out:?}");
    let last = last_line(&out);
    assert!(
        last.starts_with("sim: 20 seeds, ") && last.ends_with(" steps, 0 violations"),
        "{last}"
    );
}

#[test]
fn json_and_determinism() {
    let out = tessel(&["sim", "--seeds", "10", "--check-determinism", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&last_line(&out)).unwrap();
    assert_eq!(v["seeds"], 10);
    assert_eq!(v["violations"], 0);
    assert!(v["steps"].as_u64().unwrap() >= 10_000);
    assert_eq!(v["nondeterministic_seeds"], serde_json::json!([]));
}

#[test]
fn bad_arguments_are_refused_with_exit_2() {
    for args in [
        &["sim", "--seeds", "0"][..],
        &["sim", "--nodes", "0"],
        &["sim", "--nodes", "100000"],
        &["sim", "--steps", "abc"],
        &["sim", "--plant", "no-such-bug"],
    ] {
        let out = tessel(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?} printed no error");
    }
}

#[cfg(feature = "planted-bugs")]
#[test]
fn a_planted_bug_fails_and_its_seed_replays_it() {
    // Scan a range with the bug planted; take the first failing seed the run reports.
    let out = tessel(&[
        "sim",
        "--seeds",
        "200",
        "--first-seed",
        "0",
        "--plant",
        "place-on-failed",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&last_line(&out)).unwrap();
    assert!(v["violations"].as_u64().unwrap() > 0);
    let seed = v["first_failing_seed"].as_u64().unwrap().to_string();
    // Replaying that one seed fails the same way and says how to reproduce it.
    let replay = tessel(&["sim", "--seed", &seed, "--plant", "place-on-failed"]);
    assert_eq!(replay.status.code(), Some(1));
    let text = String::from_utf8_lossy(&replay.stdout);
    assert!(
        text.contains(&format!(
            "reproduce with: tessel sim --seed {seed} --plant place-on-failed"
        )),
        "{text}"
    );
    // The same seed without the plant is clean.
    let clean = tessel(&["sim", "--seed", &seed]);
    assert!(clean.status.success(), "{clean:?}");
}
