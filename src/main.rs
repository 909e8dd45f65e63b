//! The `sdserve` command line: serve | generate | bench | print-openapi; thin.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// HTTP image generation with Stable Diffusion 1.x / 2.x / SDXL.
#[derive(Parser)]
#[command(name = "sdserve", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from the command line, without a server.
    Generate(sdserve::cli::GenerateArgs),
    /// Time the text encoder, UNet steps, VAE decode and whole requests on a model.
    Bench(sdserve::cli::BenchArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Generate(args) => sdserve::cli::generate(&args),
        Command::Bench(args) => sdserve::cli::bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sdserve: {error:#}");
            ExitCode::FAILURE
        }
    }
}
