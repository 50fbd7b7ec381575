//! The `stableid` command line: parses flags and calls the library; no model logic here.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(error) = cli::run(args) {
        // One line that says what is wrong and what to do; the chain of causes joined by ": ".
        eprintln!("error: {}", cli::error_line(&error));
        std::process::exit(1);
    }
}
