//! The `firstkd` binary: parse arguments, run the subcommand, map errors to exit codes.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    firstkd::runtime::keep_freed_memory();
    let args = cli::Cli::parse();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = cli::run(args, &mut out);
    let _ = out.flush();
    report_peak_memory();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// With `FIRSTKD_REPORT_PEAK_RSS` set, prints the process's peak resident memory (`VmHWM`)
/// to stderr on exit: how the load test (scripts/load-test.sh) measures memory.
fn report_peak_memory() {
    if std::env::var_os("FIRSTKD_REPORT_PEAK_RSS").is_none() {
        return;
    }
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        });
    if let Some(line) = peak {
        let kib = line.split_whitespace().nth(1).unwrap_or("?");
        eprintln!("firstkd: peak RSS {kib} KiB");
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
