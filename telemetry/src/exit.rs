//! How both binaries end on an error: one line an operator can act on (kpx's error messages
//! carry their causes), no `Error:`/`Caused by:` dump, exit status 1.

use std::fmt::Display;
use std::process::ExitCode;

pub fn code<E: Display>(program: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{program}: {error}");
            ExitCode::FAILURE
        }
    }
}
