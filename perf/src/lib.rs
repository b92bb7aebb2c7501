//! `ingot-load`: the load generator and null MQTT sink Ingot is measured with.
//!
//! The trade-off this crate makes: the generator must never be the bottleneck it measures, so it
//! gives up the convenience of a thread (or a task) per simulated device for one event loop per
//! thread (mio, edge-triggered epoll) that owns many connections as plain structs. Each
//! connection keeps one reusable write buffer, one pre-encoded PUBLISH it copies and patches the
//! packet id into, and a FIFO of send times; a write is one syscall for a whole window of
//! PUBLISHes. Nothing is allocated per message in the steady state, so a single core drives a
//! null sink at millions of messages per second, far above any broker it is pointed at.
//!
//! Modules in the order a run uses them: [`cli`] (the command line), [`template`] and [`fleet`]
//! (who the devices are), [`generator`] (the event loops; [`latency`] keeps their clocks honest),
//! [`e2e`] (publish -> readable in the segment files), [`report`] (progress, summary and JSON),
//! [`plot`] (the HTML timeline), [`connections`] (idle connection scale), [`sink`] (the null
//! broker), [`pin`] (CPU affinity).

#![forbid(unsafe_code)]

pub mod cli;
pub mod connections;
pub mod e2e;
pub mod fleet;
pub mod generator;
pub mod latency;
pub mod pin;
pub mod plot;
pub mod report;
pub mod sink;
pub mod template;

/// Runs a parsed command line; the binary is this and nothing else.
pub fn main_with(cli: cli::Cli) -> anyhow::Result<()> {
    raise_fd_limit();
    match cli.command {
        cli::Command::Run(args) => generator::run_command(&args),
        cli::Command::Sink(args) => sink::run(&args),
        cli::Command::Connections(args) => connections::run(&args),
        cli::Command::Fleet(args) => fleet::fleet_command(&args),
    }
}

/// Thousands of connections need thousands of descriptors; the soft limit is often 1024 while
/// the hard limit allows far more, and raising the soft limit to the hard one needs no privilege.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        // Failing to raise it only lowers how many connections a run can open; that shows up
        // as counted connect errors, so there is nothing more to do here.
        let _ = setrlimit(Resource::Nofile, raised);
    }
}
