//! The `ingot-load` binary: see the crate documentation of `ingot_perf`.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = ingot_perf::cli::Cli::parse();
    match ingot_perf::main_with(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ingot-load: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
