//! The `outpost` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;

/// Per event the appliance allocates and frees many small blocks across
/// threads (a request's event moves from a connection's task to the
/// writer thread and back as an answer); glibc's malloc spent a sixth of
/// the appliance's CPU on them (perf, issue #29). Tests and the bench keep
/// the system allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = outpost::cli::Cli::parse();
    outpost::logging::init(cli.config.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outpost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(outpost::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}outpost: {e:#}", outpost::logging::error_prefix());
            ExitCode::FAILURE
        }
    }
}
