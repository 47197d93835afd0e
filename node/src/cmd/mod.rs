//! The command line: one module per subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod actor;
pub mod bench;
pub mod branch;
pub mod devices;
pub mod guard;
pub mod node;
pub mod produce;
pub mod replay;
pub mod sim;
pub mod status;
pub mod up;

/// tessel: a distributed actor-cluster runtime over NATS.
#[derive(Parser, Debug)]
#[command(name = "tessel", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send a command to a virtual actor and print its answer.
    Ask(actor::AskArgs),
    /// Print an actor's event history.
    Events(actor::EventsArgs),
    /// Create, list, describe, read, branch, merge and retire models.
    Model(actor::ModelArgs),
    /// Run the benchmarks and print measured figures against their baselines.
    Bench(bench::BenchArgs),
    /// Print the devices this node can hold tables in (the CPU, and CUDA devices).
    Devices(devices::DevicesArgs),
    /// Publish deltas to a model: the workload generator.
    Produce(produce::ProduceArgs),
    /// Rebuild a model's tables from checkpoints and the stream; `--verify` against the live ones.
    Replay(replay::ReplayArgs),
    /// Run one cluster node.
    Node(node::NodeArgs),
    /// Run the deterministic simulator over many seeds (or one).
    Sim(sim::SimArgs),
    /// Print the cluster's status, read from its buckets.
    Status(status::StatusArgs),
    /// Start a local cluster: NATS server(s) and nodes, until Ctrl-C.
    Up(up::UpArgs),
    /// Stop `tessel up`'s servers and nodes if it dies without doing so (started by it).
    #[command(hide = true)]
    Guard(guard::GuardArgs),
}

/// The multi-threaded runtime of the long-running subcommands (two workers: a node's work is
/// mostly waiting on NATS). Prints why and returns None when it cannot start.
pub(crate) fn runtime(who: &str) -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("{who}: cannot start the runtime: {e}");
            None
        }
    }
}

/// The exit code of a command whose standard output was closed under it (`tessel status |
/// head -1`): 128 + SIGPIPE, what a program stopped by that signal reports.
pub const EXIT_CLOSED_STDOUT: u8 = 141;

/// Whether a panic is `println!` finding standard output closed.
fn is_closed_stdout(payload: &(dyn std::any::Any + Send)) -> bool {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("");
    text.starts_with("failed printing to stdout") && text.contains("Broken pipe")
}

/// Parses the command line and runs the subcommand; the exit code is the subcommand's, or
/// [`EXIT_CLOSED_STDOUT`] when its output was closed under it. Rust ignores SIGPIPE, so a
/// write to a closed pipe fails and `println!` panics: that panic unwinds as any other (the
/// command's processes and connections are stopped by their destructors) but prints nothing.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !is_closed_stdout(info.payload()) {
            report(info);
        }
    }));
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch(cli))) {
        Ok(code) => code,
        Err(payload) if is_closed_stdout(&*payload) => ExitCode::from(EXIT_CLOSED_STDOUT),
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Ask(args) => actor::ask(args),
        Command::Events(args) => actor::events(args),
        Command::Model(args) => actor::model(args),
        Command::Bench(args) => bench::run(args),
        Command::Devices(args) => devices::run(args),
        Command::Node(args) => node::run(args),
        Command::Produce(args) => produce::produce(args),
        Command::Replay(args) => replay::run(args),
        Command::Sim(args) => sim::run(args),
        Command::Status(args) => status::run(args),
        Command::Up(args) => up::run(args),
        Command::Guard(args) => guard::run(args),
    }
}
