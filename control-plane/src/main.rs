//! The `ingot` binary: parses the command line and reports errors; everything else is in the
//! `ingot_control_plane` library.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = ingot_control_plane::cli::Cli::parse();
    match ingot_control_plane::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ingot: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
