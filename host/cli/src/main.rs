//! The `wasnap` binary: the edge where errors become one line and an exit status
//! (all of it in the library's [`wasnap_cli::main`]).

use std::process::ExitCode;

/// mimalloc, not glibc's allocator: the daemon's hot path is small, short-lived
/// allocations (redb's pages and table handles, gRPC frames) made on one thread and
/// freed on another, where glibc's arenas spent an eighth of the daemon's time
/// (`malloc`, `free`, `malloc_consolidate`; see ARCHITECTURE.md, "The daemon beside
/// containerd").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    wasnap_cli::main()
}
