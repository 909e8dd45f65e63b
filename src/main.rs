//! The `sdserve` command line: serve | generate | bench | print-openapi | samplers; thin.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sdserve::config::{ServeArgs, Settings};

/// HTTP image generation with Stable Diffusion 1.x / 2.x / SDXL.
#[derive(Parser)]
#[command(name = "sdserve", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service (with no flags: the bundled tiny model on the CPU).
    Serve(Box<ServeArgs>),
    /// Generate images from the command line, without a server.
    Generate(Box<sdserve::cli::GenerateArgs>),
    /// Time the text encoder, UNet steps, VAE decode and whole requests on a model.
    Bench(sdserve::cli::BenchArgs),
    /// Print the OpenAPI document (YAML).
    PrintOpenapi,
    /// List the samplers: ids, A1111 names, schedules and aliases.
    Samplers,
}

/// candle 0.11 asks for its thread count on nearly every operation and, unless
/// `RAYON_NUM_THREADS` is set, works it out again each time by reading and parsing
/// `/proc/cpuinfo` (thousands of reads per small image). Work it out once, here, while
/// the process is still single-threaded, and leave the answer in the variable.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

/// Keeps freed memory in the process for the next layer instead of handing it back to the
/// kernel (glibc on Linux). Every layer allocates its output, often tens of MB (a UNet
/// feed-forward's 4096 × 2560 floats, a VAE activation of 128 × 512² floats); by default
/// glibc serves blocks that large with fresh `mmap`s and unmaps them on free, so each layer
/// paid page faults and kernel page zeroing again (measured: SD 1.5 512², 8% of a UNet
/// step's CPU time and 18% of a VAE decode's). With `mmap` off for the heap and trimming
/// only past 2 GiB, the process keeps its peak working set, as PyTorch's caching
/// allocator does. One arena for all threads: glibc's per-thread arenas grow in 64 MiB
/// heaps and fall back to `mmap` for anything larger whatever `M_MMAP_MAX` says, and the
/// service's worker threads are where the networks run (measured: 2 jobs at 256² through
/// the worker, system time 10.9 → 6.3 s). Setting `GLIBC_TUNABLES` with any `glibc.malloc` tunable leaves the
/// allocator as configured there.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    let tuned_by_user = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc"));
    if !tuned_by_user {
        // SAFETY: mallopt only changes allocator parameters; it is called before any other
        // thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

fn main() -> ExitCode {
    pin_thread_count();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    keep_freed_memory();
    match Cli::parse().command {
        Command::Serve(args) => serve(&args),
        Command::Generate(args) => report(sdserve::cli::generate(&args)),
        Command::Bench(args) => report(sdserve::cli::bench(&args)),
        Command::PrintOpenapi => {
            print!("{}", sdserve::api::openapi::openapi_yaml());
            ExitCode::SUCCESS
        }
        Command::Samplers => {
            print!("{}", sdserve::cli::sampler_table());
            ExitCode::SUCCESS
        }
    }
}

/// Exit status of a library command: failure with its error chain on stderr.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sdserve: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let settings = match Settings::load(args) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("sdserve: {error}");
            return ExitCode::from(2);
        }
    };
    init_logging(settings.json_logs);
    tracing::info!(?settings, "starting");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sdserve: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sdserve::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("sdserve: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Text or JSON logs to stderr; `RUST_LOG` filters (default: info).
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}
