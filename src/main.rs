//! The `expanse` process: parses the command line, sets what is process-wide (allocator, SIGPIPE,
//! backtraces, the panic hook), runs the command (`expanse::cmd`) and maps its outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use expanse::cmd::{Cli, Command, Failure};

/// Parses the command line. A usage error (unknown flag, flags that exclude each other) is one line
/// like every other bad input — clap's message and tip, without its usage block — and exit 2;
/// `--help` and `--version` print as clap prints them.
fn parse_args() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}", one_line(&e.render().to_string()));
            std::process::exit(2);
        }
    }
}

/// clap's multi-line error as one line: its non-empty lines, less the usage hints, joined.
fn one_line(message: &str) -> String {
    let mut line = String::new();
    for part in message.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if part.starts_with("Usage:") || part.starts_with("For more information") {
            continue;
        }
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    line
}

/// The system allocator, with the memory budget a chat template renders under (`expanse::budget`).
#[global_allocator]
static ALLOC: expanse::budget::BudgetedAlloc = expanse::budget::BudgetedAlloc;

/// Exit codes (the README's table lists them all): 0 success, 1 a check that ran and failed, 2 bad
/// input, 3 an internal or device failure (a panic included); 130 after Ctrl-C. A reader that closes
/// our output early (`| head`) ends the process by SIGPIPE, as it does `cat` — except `serve`'s.
fn main() -> ExitCode {
    let cli = parse_args();
    // A server writes to its clients, not to a reader of stdout: a client that leaves mid-answer
    // must end its own connection (EPIPE), not the process, so serve keeps Rust's SIG_IGN.
    if !matches!(cli.command, Command::Serve(_)) {
        quiet_on_closed_pipe();
    }
    if std::env::var("EXPANSE_BACKTRACE").is_ok_and(|v| v == "1") {
        // Read by std (and so candle) when an error captures its backtrace; nothing runs in parallel yet.
        std::env::set_var("RUST_LIB_BACKTRACE", "1");
    }
    std::panic::set_hook(Box::new(report_panic));
    // A panic is reported by the hook in one line; unwinding to here turns it into exit 3.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| expanse::cmd::run(cli))) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(Failure::Check(msg))) => {
            eprintln!("{msg}");
            ExitCode::from(1)
        }
        Ok(Err(Failure::Error(e))) => {
            let hint = if e.exit_code() == 3 && !expanse::error::backtrace_requested() { BACKTRACE_HINT } else { "" };
            eprintln!("error: {e}{hint}");
            if let Some(bt) = e.backtrace().filter(|_| expanse::error::backtrace_requested()) {
                eprintln!("{bt}");
            }
            ExitCode::from(e.exit_code())
        }
        Err(_) => ExitCode::from(3),
    }
}

const BACKTRACE_HINT: &str = " (EXPANSE_BACKTRACE=1 shows a backtrace)";

/// Rust ignores SIGPIPE, which turns a closed stdout into a panic in `println!`. The default action
/// ends the process quietly instead, as Unix tools do. For the commands that write to stdout only.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called in main right after the arguments are parsed, before any other thread exists;
    // SIG_DFL is a valid disposition for SIGPIPE and no handler code is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A panic is a bug: one line saying where, the backtrace only when asked for.
fn report_panic(info: &std::panic::PanicHookInfo<'_>) {
    use std::io::Write;
    let msg = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into());
    let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
    let mut err = std::io::stderr().lock();
    if expanse::error::backtrace_requested() {
        let _ = writeln!(err, "error: internal error: {msg}{at}\n{}", std::backtrace::Backtrace::force_capture());
    } else {
        let _ = writeln!(err, "error: internal error: {msg}{at}{BACKTRACE_HINT}");
    }
}
