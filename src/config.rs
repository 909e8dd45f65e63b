//! Typed settings of `sdserve serve`: the built-in `config/default.toml`, an optional TOML
//! file merged over it, then command-line flags and `SDSERVE_*` environment variables on
//! top. Validated once at start; the rest of the service trusts them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use serde::Deserialize;

use crate::adapters::controlnet::ControlNetLibrary;
use crate::adapters::embeddings::EmbeddingLibrary;
use crate::adapters::t2i::T2IAdapterLibrary;

use crate::codec::ImageFormat;
use crate::pipeline::Limits;

/// The built-in configuration; every other source only overrides parts of it.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/default.toml");

/// A configuration problem, reported before the server starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: String, message: String },
    #[error("invalid setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// Precision a model is loaded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Dtype {
    /// The candle dtype.
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Precision of the CPU kernels' matrix products (convolutions, linear layers, attention),
/// process-wide: `bf16` rounds their operands to bf16 and accumulates in f32 on CPUs with
/// AVX512-BF16 (faster, less exact; tensors between layers stay f32); elsewhere, and with
/// `f32` (the default), the products are f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CpuMatmul {
    #[default]
    F32,
    Bf16,
}

impl CpuMatmul {
    /// Makes this the process's setting; returns the one in effect (f32 where the CPU
    /// cannot do bf16).
    pub fn apply(self) -> CpuMatmul {
        use sdserve_cpu_kernels::MatmulPrecision;
        let wanted = match self {
            CpuMatmul::F32 => MatmulPrecision::F32,
            CpuMatmul::Bf16 => MatmulPrecision::Bf16,
        };
        match crate::models::layers::set_cpu_matmul(wanted) {
            MatmulPrecision::F32 => CpuMatmul::F32,
            MatmulPrecision::Bf16 => CpuMatmul::Bf16,
        }
    }
}

/// An API key; never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(pub String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// One entry of the model registry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The name requests use in `model`.
    pub name: String,
    /// A diffusers folder or a single `.safetensors` checkpoint.
    pub path: PathBuf,
    #[serde(default)]
    pub dtype: Dtype,
}

/// Limits on requests.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub max_width: u32,
    pub max_height: u32,
    pub max_steps: u32,
    pub max_n: u32,
    pub max_prompt_chars: usize,
    /// Largest accepted request body in bytes (413 above).
    pub max_body_bytes: usize,
}

/// Output defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSettings {
    /// `png`, `jpeg` or `webp`.
    pub format: String,
    /// JPEG/WebP quality, 1-100.
    pub quality: u8,
}

/// Every setting of the service (see `config/default.toml` for what each means).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub bind: SocketAddr,
    pub api_keys: Vec<ApiKey>,
    pub json_logs: bool,
    pub devices: Vec<String>,
    pub workers_per_device: usize,
    pub queue_capacity: usize,
    pub job_timeout_secs: u64,
    pub result_retention_secs: u64,
    pub drain_timeout_secs: u64,
    /// Empty: the first model.
    pub default_model: String,
    pub models: Vec<ModelSpec>,
    pub limits: LimitSettings,
    pub output: OutputSettings,
    /// Directories of textual-inversion embeddings (`.safetensors`, used by file stem in
    /// prompts); an earlier directory wins on equal names.
    #[serde(default)]
    pub embeddings_dirs: Vec<PathBuf>,
    /// Directories whose `.safetensors` files requests may name as LoRAs.
    #[serde(default)]
    pub lora_dirs: Vec<PathBuf>,
    /// Memory bound (MiB) of the cache of parsed LoRA files.
    #[serde(default = "default_lora_cache_mb")]
    pub lora_cache_mb: usize,
    /// Directories whose T2I-Adapters (diffusers folders, `.safetensors` files) requests
    /// may name.
    #[serde(default)]
    pub t2i_adapter_dirs: Vec<PathBuf>,
    /// Directories whose ControlNets (diffusers folders or `.safetensors` files)
    /// requests may name.
    #[serde(default)]
    pub controlnet_dirs: Vec<PathBuf>,
    /// Directories of IP-Adapters requests may name (`ip_adapters: [{model, image,
    /// scale}]`): weights `.safetensors` files with their `image_encoder/` folder beside
    /// them, named by their path below the directory without the extension.
    #[serde(default)]
    pub ip_adapter_dirs: Vec<PathBuf>,
    /// Compatible queued jobs a worker runs as one batch (1: one job at a time).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long (ms) a worker holding a batchable job waits for compatible ones.
    #[serde(default)]
    pub batch_wait_ms: u64,
    /// `vae_tiling: "auto"` tiles the VAE for images of at least this many pixels.
    #[serde(default = "default_vae_tiling_auto_pixels")]
    pub vae_tiling_auto_pixels: u64,
    /// Precision of the CPU matrix products: `f32` or `bf16` (see [`CpuMatmul`]).
    #[serde(default)]
    pub cpu_matmul: CpuMatmul,
}

fn default_lora_cache_mb() -> usize {
    512
}

fn default_max_batch() -> usize {
    1
}

fn default_vae_tiling_auto_pixels() -> u64 {
    crate::pipeline::memory::DEFAULT_VAE_TILING_AUTO_PIXELS
}

/// Flags of `sdserve serve`; each overrides the configuration file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file; keys it lacks keep their built-in defaults
    /// (config/default.toml).
    #[arg(long, env = "SDSERVE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address and port to listen on.
    #[arg(long, env = "SDSERVE_BIND", value_name = "ADDR:PORT")]
    pub bind: Option<SocketAddr>,
    /// A model to serve: a diffusers folder or a single .safetensors file, named after its
    /// folder or file stem. Repeatable; the first is the default. Replaces the configured
    /// models.
    #[arg(long = "model", env = "SDSERVE_MODELS", value_delimiter = ',', value_name = "PATH")]
    pub models: Vec<PathBuf>,
    /// Precision of the models given with --model.
    #[arg(long, env = "SDSERVE_DTYPE", value_enum)]
    pub dtype: Option<Dtype>,
    /// Model used when a request names none.
    #[arg(long, env = "SDSERVE_DEFAULT_MODEL", value_name = "NAME")]
    pub default_model: Option<String>,
    /// Device to run on (cpu, cuda, cuda:N, metal, metal:N). Repeatable.
    #[arg(long = "device", env = "SDSERVE_DEVICES", value_delimiter = ',', value_name = "DEVICE")]
    pub devices: Vec<String>,
    /// Jobs each device runs at the same time.
    #[arg(long, env = "SDSERVE_WORKERS_PER_DEVICE", value_name = "N")]
    pub workers_per_device: Option<usize>,
    /// Jobs that may wait (running jobs not counted); beyond it requests get 429.
    #[arg(long, env = "SDSERVE_QUEUE_CAPACITY", value_name = "N")]
    pub queue_capacity: Option<usize>,
    /// An accepted API key (Authorization: Bearer KEY or x-api-key). Repeatable.
    #[arg(
        long = "api-key",
        env = "SDSERVE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Seconds after submission at which an unfinished job fails.
    #[arg(long, env = "SDSERVE_JOB_TIMEOUT_SECS", value_name = "SECONDS")]
    pub job_timeout_secs: Option<u64>,
    /// Seconds finished jobs and their images are kept (then 410).
    #[arg(long, env = "SDSERVE_RESULT_RETENTION_SECS", value_name = "SECONDS")]
    pub result_retention_secs: Option<u64>,
    /// Seconds queued and running jobs may take to finish on shutdown.
    #[arg(long, env = "SDSERVE_DRAIN_TIMEOUT_SECS", value_name = "SECONDS")]
    pub drain_timeout_secs: Option<u64>,
    /// Largest image width accepted.
    #[arg(long, env = "SDSERVE_MAX_WIDTH")]
    pub max_width: Option<u32>,
    /// Largest image height accepted.
    #[arg(long, env = "SDSERVE_MAX_HEIGHT")]
    pub max_height: Option<u32>,
    /// Largest step count accepted.
    #[arg(long, env = "SDSERVE_MAX_STEPS")]
    pub max_steps: Option<u32>,
    /// Most images per request.
    #[arg(long, env = "SDSERVE_MAX_N")]
    pub max_n: Option<u32>,
    /// Longest prompt (and negative prompt) in characters.
    #[arg(long, env = "SDSERVE_MAX_PROMPT_CHARS")]
    pub max_prompt_chars: Option<usize>,
    /// Largest request body in bytes.
    #[arg(long, env = "SDSERVE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Default output format: png, jpeg or webp.
    #[arg(long, env = "SDSERVE_OUTPUT_FORMAT")]
    pub output_format: Option<String>,
    /// Default JPEG/WebP quality (1-100).
    #[arg(long, env = "SDSERVE_OUTPUT_QUALITY")]
    pub output_quality: Option<u8>,
    /// Log JSON lines instead of text.
    #[arg(long, env = "SDSERVE_JSON_LOGS")]
    pub json_logs: bool,
    /// A directory of textual-inversion embeddings (.safetensors; a prompt uses one by its
    /// file stem). Repeatable; replaces the configured `embeddings_dirs`.
    #[arg(
        long = "embeddings-dir",
        env = "SDSERVE_EMBEDDINGS_DIRS",
        value_delimiter = ',',
        value_name = "DIR"
    )]
    pub embeddings_dirs: Vec<PathBuf>,
    /// A directory of LoRA `.safetensors` files requests may name (repeatable; adds to
    /// the config file's `lora_dirs`).
    #[arg(long = "lora-dir", env = "SDSERVE_LORA_DIRS", value_delimiter = ',', value_name = "DIR")]
    pub lora_dirs: Vec<PathBuf>,
    /// Memory bound (MiB) of the parsed-LoRA cache.
    #[arg(long, env = "SDSERVE_LORA_CACHE_MB", value_name = "MIB")]
    pub lora_cache_mb: Option<usize>,
    /// A directory of T2I-Adapters (diffusers folders or .safetensors files) requests may
    /// name (repeatable; adds to the config file's `t2i_adapter_dirs`).
    #[arg(
        long = "t2i-adapter-dir",
        env = "SDSERVE_T2I_ADAPTER_DIRS",
        value_delimiter = ',',
        value_name = "DIR"
    )]
    pub t2i_adapter_dirs: Vec<PathBuf>,
    /// A directory of ControlNets requests may name: diffusers folders (by folder name)
    /// or `.safetensors` files (by stem). Repeatable; adds to the config file's
    /// `controlnet_dirs`.
    #[arg(
        long = "controlnet-dir",
        env = "SDSERVE_CONTROLNET_DIRS",
        value_delimiter = ',',
        value_name = "DIR"
    )]
    pub controlnet_dirs: Vec<PathBuf>,
    /// A directory of IP-Adapters (weights files with `image_encoder/` beside them)
    /// requests may name (repeatable; adds to the config file's `ip_adapter_dirs`).
    #[arg(
        long = "ip-adapter-dir",
        env = "SDSERVE_IP_ADAPTER_DIRS",
        value_delimiter = ',',
        value_name = "DIR"
    )]
    pub ip_adapter_dirs: Vec<PathBuf>,
    /// Compatible queued jobs (same model, size, steps, sampler, guidance) a worker runs
    /// as one batch; 1 runs one job at a time.
    #[arg(long, env = "SDSERVE_MAX_BATCH", value_name = "N")]
    pub max_batch: Option<usize>,
    /// Milliseconds a worker waits for compatible jobs to fill a batch.
    #[arg(long, env = "SDSERVE_BATCH_WAIT_MS", value_name = "MS")]
    pub batch_wait_ms: Option<u64>,
    /// `vae_tiling: "auto"` tiles the VAE for images of at least this many pixels.
    #[arg(long, env = "SDSERVE_VAE_TILING_AUTO_PIXELS", value_name = "PIXELS")]
    pub vae_tiling_auto_pixels: Option<u64>,
    /// Precision of the CPU matrix products: f32 (default) or bf16 (AVX512-BF16 CPUs:
    /// bf16 operands, f32 accumulation; faster, less exact).
    #[arg(long, env = "SDSERVE_CPU_MATMUL", value_enum)]
    pub cpu_matmul: Option<CpuMatmul>,
}

impl Settings {
    /// The built-in settings (config/default.toml), validated.
    pub fn builtin() -> Result<Settings, ConfigError> {
        Settings::load(&ServeArgs::default())
    }

    /// Builds the settings from the built-in defaults, the file `args.config` and the
    /// flags, then validates them.
    pub fn load(args: &ServeArgs) -> Result<Settings, ConfigError> {
        let mut table = parse_toml("config/default.toml (built in)", DEFAULT_CONFIG_TOML)?;
        if let Some(path) = &args.config {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            merge_tables(&mut table, parse_toml(&path.display().to_string(), &text)?);
        }
        let mut settings: Settings =
            toml::Value::Table(table).try_into().map_err(|e| ConfigError::Parse {
                path: args
                    .config
                    .as_ref()
                    .map_or("config/default.toml".into(), |p| p.display().to_string()),
                message: e.to_string(),
            })?;
        settings.apply(args)?;
        settings.validate()?;
        Ok(settings)
    }

    fn apply(&mut self, args: &ServeArgs) -> Result<(), ConfigError> {
        if let Some(bind) = args.bind {
            self.bind = bind;
        }
        if !args.models.is_empty() {
            let dtype = args.dtype.unwrap_or_default();
            self.models = args
                .models
                .iter()
                .map(|path| {
                    Ok(ModelSpec { name: model_name_from_path(path)?, path: path.clone(), dtype })
                })
                .collect::<Result<_, ConfigError>>()?;
            self.default_model.clear();
        } else if let Some(dtype) = args.dtype {
            self.models.iter_mut().for_each(|m| m.dtype = dtype);
        }
        if let Some(name) = &args.default_model {
            self.default_model = name.clone();
        }
        if !args.devices.is_empty() {
            self.devices = args.devices.clone();
        }
        if !args.api_keys.is_empty() {
            self.api_keys = args.api_keys.iter().cloned().map(ApiKey).collect();
        }
        self.json_logs |= args.json_logs;
        let overrides = [
            (&mut self.workers_per_device, args.workers_per_device),
            (&mut self.queue_capacity, args.queue_capacity),
            (&mut self.limits.max_prompt_chars, args.max_prompt_chars),
            (&mut self.limits.max_body_bytes, args.max_body_bytes),
        ];
        for (slot, value) in overrides {
            if let Some(value) = value {
                *slot = value;
            }
        }
        for (slot, value) in [
            (&mut self.job_timeout_secs, args.job_timeout_secs),
            (&mut self.result_retention_secs, args.result_retention_secs),
            (&mut self.drain_timeout_secs, args.drain_timeout_secs),
        ] {
            if let Some(value) = value {
                *slot = value;
            }
        }
        for (slot, value) in [
            (&mut self.limits.max_width, args.max_width),
            (&mut self.limits.max_height, args.max_height),
            (&mut self.limits.max_steps, args.max_steps),
            (&mut self.limits.max_n, args.max_n),
        ] {
            if let Some(value) = value {
                *slot = value;
            }
        }
        if !args.embeddings_dirs.is_empty() {
            self.embeddings_dirs = args.embeddings_dirs.clone();
        }
        if let Some(format) = &args.output_format {
            self.output.format = format.clone();
        }
        if let Some(quality) = args.output_quality {
            self.output.quality = quality;
        }
        self.lora_dirs.extend(args.lora_dirs.iter().cloned());
        if let Some(megabytes) = args.lora_cache_mb {
            self.lora_cache_mb = megabytes;
        }
        self.t2i_adapter_dirs.extend(args.t2i_adapter_dirs.iter().cloned());
        self.controlnet_dirs.extend(args.controlnet_dirs.iter().cloned());
        self.ip_adapter_dirs.extend(args.ip_adapter_dirs.iter().cloned());
        if let Some(max_batch) = args.max_batch {
            self.max_batch = max_batch;
        }
        if let Some(wait) = args.batch_wait_ms {
            self.batch_wait_ms = wait;
        }
        if let Some(pixels) = args.vae_tiling_auto_pixels {
            self.vae_tiling_auto_pixels = pixels;
        }
        if let Some(precision) = args.cpu_matmul {
            self.cpu_matmul = precision;
        }
        Ok(())
    }

    /// Checks every setting; also resolves model paths (see [`resolve_model_path`]).
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.models.is_empty() {
            return Err(invalid("models", "at least one model is needed"));
        }
        for (i, model) in self.models.iter().enumerate() {
            if model.name.trim().is_empty() {
                return Err(invalid("models", format!("model #{} has an empty name", i + 1)));
            }
            if self.models[..i].iter().any(|other| other.name == model.name) {
                return Err(invalid("models", format!("two models are named {:?}", model.name)));
            }
        }
        for model in &mut self.models {
            model.path = resolve_model_path(&model.path);
        }
        if self.default_model.is_empty() {
            self.default_model = self.models[0].name.clone();
        } else if !self.models.iter().any(|m| m.name == self.default_model) {
            return Err(invalid(
                "default_model",
                format!(
                    "{:?} is not one of the models ({})",
                    self.default_model,
                    self.model_names()
                ),
            ));
        }
        for dir in &self.lora_dirs {
            if !dir.is_dir() {
                return Err(invalid("lora_dirs", format!("{} is not a directory", dir.display())));
            }
        }
        for dir in &mut self.t2i_adapter_dirs {
            *dir = resolve_model_path(dir);
            if !dir.is_dir() {
                let message = format!("{} is not a directory", dir.display());
                return Err(invalid("t2i_adapter_dirs", message));
            }
        }
        for dir in &self.controlnet_dirs {
            if !dir.is_dir() {
                return Err(invalid(
                    "controlnet_dirs",
                    format!("{} is not a directory", dir.display()),
                ));
            }
        }
        for dir in &self.ip_adapter_dirs {
            if !dir.is_dir() {
                return Err(invalid(
                    "ip_adapter_dirs",
                    format!("{} is not a directory", dir.display()),
                ));
            }
        }
        if self.devices.is_empty() || self.devices.iter().any(|d| d.trim().is_empty()) {
            return Err(invalid("devices", "list at least one device, e.g. [\"cpu\"]"));
        }
        if self.workers_per_device == 0 {
            return Err(invalid("workers_per_device", "must be at least 1"));
        }
        if self.queue_capacity == 0 {
            return Err(invalid("queue_capacity", "must be at least 1"));
        }
        if !(1..=64).contains(&self.max_batch) {
            return Err(invalid("max_batch", "must be between 1 and 64"));
        }
        if self.batch_wait_ms > 60_000 {
            return Err(invalid("batch_wait_ms", "must be at most 60000 (one minute)"));
        }
        if self.job_timeout_secs == 0 {
            return Err(invalid("job_timeout_secs", "must be at least 1"));
        }
        if self.result_retention_secs == 0 {
            return Err(invalid("result_retention_secs", "must be at least 1"));
        }
        if self.api_keys.iter().any(|k| k.0.is_empty()) {
            return Err(invalid("api_keys", "an API key must not be empty"));
        }
        let limits = &self.limits;
        for (key, value) in [
            ("limits.max_width", limits.max_width),
            ("limits.max_height", limits.max_height),
            ("limits.max_steps", limits.max_steps),
            ("limits.max_n", limits.max_n),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if limits.max_body_bytes < 1024 {
            return Err(invalid("limits.max_body_bytes", "must be at least 1024"));
        }
        if ImageFormat::from_name(&self.output.format).is_none() {
            return Err(invalid(
                "output.format",
                format!("{:?} is not one of png, jpeg, webp", self.output.format),
            ));
        }
        if !(1..=100).contains(&self.output.quality) {
            return Err(invalid("output.quality", "must be between 1 and 100"));
        }
        for dir in &mut self.embeddings_dirs {
            *dir = resolve_model_path(dir);
            if !dir.is_dir() {
                return Err(invalid(
                    "embeddings_dirs",
                    format!("{} is not a directory", dir.display()),
                ));
            }
        }
        Ok(())
    }

    /// The ControlNet library of `controlnet_dirs` (empty when none are configured).
    pub fn controlnet_library(&self) -> Arc<ControlNetLibrary> {
        Arc::new(ControlNetLibrary::new(
            self.controlnet_dirs.clone(),
            crate::adapters::controlnet::DEFAULT_CACHED_CONTROLNETS,
        ))
    }

    /// The embedding library of `embeddings_dirs`; `None` when none are configured.
    pub fn embedding_library(&self) -> Result<Option<Arc<EmbeddingLibrary>>, ConfigError> {
        if self.embeddings_dirs.is_empty() {
            return Ok(None);
        }
        EmbeddingLibrary::new(&self.embeddings_dirs)
            .map(|library| Some(Arc::new(library)))
            .map_err(|e| invalid("embeddings_dirs", e.to_string()))
    }

    /// The T2I-Adapter library of `t2i_adapter_dirs` (empty when none are configured).
    pub fn t2i_adapter_library(&self) -> Arc<T2IAdapterLibrary> {
        Arc::new(T2IAdapterLibrary::new(self.t2i_adapter_dirs.clone()))
    }

    /// The request limits the pipeline validates against.
    pub fn request_limits(&self) -> Limits {
        Limits {
            max_width: self.limits.max_width,
            max_height: self.limits.max_height,
            max_steps: self.limits.max_steps,
            max_n: self.limits.max_n,
            max_prompt_chars: self.limits.max_prompt_chars,
        }
    }

    /// The default output format.
    pub fn output_format(&self) -> ImageFormat {
        ImageFormat::from_name(&self.output.format)
            .expect("output.format was validated; this is a bug")
    }

    /// Worker slots over all devices.
    pub fn worker_slots(&self) -> usize {
        self.devices.len() * self.workers_per_device
    }

    fn model_names(&self) -> String {
        self.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// The registry name of a model given by path: its folder name, or its file stem.
pub fn model_name_from_path(path: &Path) -> Result<String, ConfigError> {
    let name = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .map(str::to_owned)
        .ok_or_else(|| invalid("model", format!("cannot name a model after {}", path.display())))
}

/// A relative model path is taken from the working directory; when nothing is there, from
/// the source checkout this binary was built from, so `cargo run -- serve` finds the
/// bundled model from any directory of the checkout.
pub fn resolve_model_path(path: &Path) -> PathBuf {
    if path.is_absolute() || path.exists() {
        return path.to_path_buf();
    }
    let in_checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if in_checkout.exists() {
        in_checkout
    } else {
        path.to_path_buf()
    }
}

fn parse_toml(origin: &str, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Parse { path: origin.to_string(), message: e.to_string() })
}

/// Merges `overlay` into `base`: tables key by key, everything else (arrays too) replaced.
fn merge_tables(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(overlay_table)) => {
                merge_tables(base_table, overlay_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_config_serves_the_bundled_model() {
        let settings = Settings::builtin().unwrap();
        assert_eq!(settings.models.len(), 1);
        assert_eq!(settings.default_model, settings.models[0].name);
        assert!(settings.models[0].path.ends_with("models/shapes"));
        assert_eq!(settings.devices, vec!["cpu".to_string()]);
        assert_eq!(settings.output_format(), ImageFormat::Png);
    }

    #[test]
    fn a_file_overrides_only_its_keys() {
        let dir = std::env::temp_dir().join(format!("sdserve-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("partial.toml");
        std::fs::write(&file, "queue_capacity = 3\n[limits]\nmax_steps = 10\n").unwrap();
        let settings =
            Settings::load(&ServeArgs { config: Some(file), ..Default::default() }).unwrap();
        assert_eq!(settings.queue_capacity, 3);
        assert_eq!(settings.limits.max_steps, 10);
        assert_eq!(settings.limits.max_width, 1024, "untouched keys keep their defaults");
    }

    #[test]
    fn flags_override_the_file() {
        let args = ServeArgs {
            models: vec!["/m/dreamshaper_8.safetensors".into(), "/m/sd-turbo".into()],
            queue_capacity: Some(2),
            api_keys: vec!["secret".into()],
            ..Default::default()
        };
        let settings = Settings::load(&args).unwrap();
        let names: Vec<&str> = settings.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["dreamshaper_8", "sd-turbo"]);
        assert_eq!(settings.default_model, "dreamshaper_8");
        assert_eq!(settings.queue_capacity, 2);
        assert!(!format!("{settings:?}").contains("secret"), "API keys are redacted");
    }

    #[test]
    fn bad_settings_name_their_key() {
        let cases = [
            ServeArgs { queue_capacity: Some(0), ..Default::default() },
            ServeArgs { default_model: Some("nope".into()), ..Default::default() },
            ServeArgs { output_format: Some("gif".into()), ..Default::default() },
            ServeArgs { output_quality: Some(0), ..Default::default() },
        ];
        let keys = ["queue_capacity", "default_model", "output.format", "output.quality"];
        for (args, key) in cases.into_iter().zip(keys) {
            match Settings::load(&args) {
                Err(ConfigError::Invalid { key: got, .. }) => assert_eq!(got, key),
                other => panic!("expected an error for {key}, got {other:?}"),
            }
        }
    }

    #[test]
    fn t2i_adapter_dirs_come_from_flags_and_must_exist() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t2i_adapters");
        let args = ServeArgs { t2i_adapter_dirs: vec![fixtures.clone()], ..Default::default() };
        let settings = Settings::load(&args).unwrap();
        assert_eq!(settings.t2i_adapter_dirs, vec![fixtures]);
        assert_eq!(settings.t2i_adapter_library().list().len(), 3);
        let args =
            ServeArgs { t2i_adapter_dirs: vec!["/no/such/dir".into()], ..Default::default() };
        match Settings::load(&args) {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "t2i_adapter_dirs"),
            other => panic!("expected an error for t2i_adapter_dirs, got {other:?}"),
        }
    }

    #[test]
    fn cpu_matmul_comes_from_the_file_or_the_flag() {
        assert_eq!(Settings::builtin().unwrap().cpu_matmul, CpuMatmul::F32);
        let mut table = parse_toml("test", DEFAULT_CONFIG_TOML).unwrap();
        merge_tables(&mut table, parse_toml("test", "cpu_matmul = \"bf16\"").unwrap());
        let parsed: Settings = toml::Value::Table(table).try_into().unwrap();
        assert_eq!(parsed.cpu_matmul, CpuMatmul::Bf16);
        let args = ServeArgs { cpu_matmul: Some(CpuMatmul::Bf16), ..Default::default() };
        assert_eq!(Settings::load(&args).unwrap().cpu_matmul, CpuMatmul::Bf16);
        let mut table = parse_toml("test", DEFAULT_CONFIG_TOML).unwrap();
        merge_tables(&mut table, parse_toml("test", "cpu_matmul = \"fp8\"").unwrap());
        assert!(toml::Value::Table(table).try_into::<Settings>().is_err());
    }

    #[test]
    fn unknown_keys_in_a_file_are_errors() {
        let mut table = parse_toml("test", DEFAULT_CONFIG_TOML).unwrap();
        merge_tables(&mut table, parse_toml("test", "queue_capacityy = 3").unwrap());
        let parsed: Result<Settings, _> = toml::Value::Table(table).try_into();
        assert!(parsed.unwrap_err().to_string().contains("queue_capacityy"));
    }
}
