//! `event-processor`: parse the command line and hand over to the library.

use activity_event_processor::cli::{self, Cli};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main(Cli::parse())
}
