//! `tessel`: the command-line entry point of a tessel node and its tools.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

/// tessel: a distributed actor-cluster runtime over NATS.
#[derive(Parser, Debug)]
#[command(name = "tessel", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the deterministic simulator over many seeds (or one).
    Sim(cmd::sim::SimArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Sim(args) => cmd::sim::run(args),
    }
}
