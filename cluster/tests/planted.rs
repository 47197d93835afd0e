//! The simulator has teeth: each planted bug is found within 2,000 seeds, the seed that finds it
//! replays the same finding, and the same seeds without the bug find nothing.
#![cfg(feature = "planted-bugs")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use cluster::core::PlantedBug;
use cluster::sim::{SimConfig, run};

const SEED_BUDGET: u64 = 2_000;

fn sim(seed: u64, plant: Option<PlantedBug>) -> cluster::sim::Report {
    run(&SimConfig {
        seed,
        plant,
        ..SimConfig::default()
    })
    .unwrap()
}

fn finds(bug: PlantedBug) {
    let found = (0..SEED_BUDGET).find(|&seed| !sim(seed, Some(bug)).violations.is_empty());
    let Some(seed) = found else {
        panic!("{} not found within {SEED_BUDGET} seeds", bug.name());
    };
    let first = sim(seed, Some(bug));
    let again = sim(seed, Some(bug));
    assert_eq!(
        first.violations,
        again.violations,
        "seed {seed} does not replay {}",
        bug.name()
    );
    assert_eq!(first.trace, again.trace);
    for clean_seed in 0..=seed {
        let report = sim(clean_seed, None);
        assert!(
            report.violations.is_empty(),
            "seed {clean_seed} without a plant: {:?}",
            report.violations
        );
    }
    eprintln!(
        "{}: found at seed {seed}: {}",
        bug.name(),
        first.violations[0]
    );
}

#[test]
fn stale_leader_write_is_found() {
    finds(PlantedBug::StaleLeaderWrite);
}

#[test]
fn place_on_failed_is_found() {
    finds(PlantedBug::PlaceOnFailed);
}

#[test]
fn renew_without_cas_is_found() {
    finds(PlantedBug::RenewWithoutCas);
}
