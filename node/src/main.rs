//! `tessel`: the command-line entry point of a tessel node and its tools.

use std::process::ExitCode;

fn main() -> ExitCode {
    tessel_node::cmd::main()
}
