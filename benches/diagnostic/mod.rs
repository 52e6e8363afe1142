//! What the diagnostic benches (`hit_ratio`, `memory_per_key`, `flusher_wakes`,
//! `put_layout`) share: they run under `cargo bench --bench <name>` only, and take
//! positional arguments.

/// The positional arguments, without the flags `cargo bench` passes; `None` when the target
/// runs under `cargo test` (no `--bench` flag), which only builds it.
pub fn bench_args() -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("a diagnostic: run it with `cargo bench --bench <name>`");
        return None;
    }
    Some(args.into_iter().filter(|a| !a.starts_with("--")).collect())
}
