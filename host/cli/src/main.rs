//! The `wasnap` binary: the edge where errors become one line and an exit status
//! (all of it in the library's [`wasnap_cli::main`]).

use std::process::ExitCode;

fn main() -> ExitCode {
    wasnap_cli::main()
}
