//! The command line: one module per subcommand. Errors become one line on stderr and exit
//! status 1 (usage errors: 2, from clap); nothing panics on user input.

mod inspect;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ottkv",
    version,
    about = "A 2-bit KV cache with outlier-token tracing for GGUF models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a GGUF model: architecture, shapes, tensor types, KV-cache bytes per token.
    Inspect(inspect::Args),
}

/// Runs the command line and returns the process exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let result = std::panic::catch_unwind(|| match cli.cmd {
        Command::Inspect(a) => inspect::run(&a),
    });
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            1
        }
        Err(_) => {
            eprintln!("error: internal error (a bug: please report it with the command line)");
            1
        }
    }
}
