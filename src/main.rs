//! `event-processor`: parse the command line and hand over to the library.

use activity_event_processor::cli;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Crash points for the crash-matrix test, armed from FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let _failpoints = match activity_event_processor::failpoint::setup() {
        Ok(scenario) => scenario,
        Err(err) => {
            eprintln!("invalid FAILPOINTS: {err}");
            return ExitCode::from(cli::EXIT_CONFIG);
        }
    };
    // The command line with every command's examples in its --help.
    cli::main(cli::examples::parse())
}
