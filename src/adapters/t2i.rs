//! T2I-Adapters by name: found directly inside the configured directories (a diffusers
//! folder with `config.json`, named by the folder, or a single `.safetensors` file, named
//! by its stem), confined to those directories, loaded on first use and kept in a small
//! cache per device and dtype.
//!
//! A single file holds diffusers' key names (`adapter.conv_in.weight`, ...) or those of
//! TencentARC's original `Adapter` / `Adapter_light` (see [`from_original_layout`]); its
//! config comes from a sidecar `<stem>.config.json` when there is one, otherwise from the
//! tensor shapes (see [`infer_config`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, DeviceLocation, Tensor};
use candle_nn::VarBuilder;

use crate::adapters::directory::{self, EntryKind, FileStamp, ModelCache, NameShape};
use crate::models::t2i_adapter::{T2IAdapter, T2IAdapterConfig};

/// Most T2I-Adapters one request may use.
pub const MAX_T2I_ADAPTERS_PER_REQUEST: usize = 4;
/// Largest conditioning scale a request may give an adapter.
pub const MAX_T2I_ADAPTER_SCALE: f64 = 10.0;
/// Loaded adapters kept in memory (over all devices and dtypes).
const CACHE_ENTRIES: usize = 8;

/// Finding or loading a T2I-Adapter went wrong; messages are written for users.
#[derive(Debug, Clone, thiserror::Error)]
pub enum T2IAdapterError {
    #[error(
        "unknown T2I-Adapter {0:?}: no such folder or .safetensors file in the configured \
         T2I-Adapter directories"
    )]
    UnknownName(String),
    #[error("T2I-Adapter name {name:?} is not allowed: {reason}")]
    BadName { name: String, reason: String },
    #[error("T2I-Adapter {path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
}

fn bad_file(path: &Path, reason: impl std::fmt::Display) -> T2IAdapterError {
    T2IAdapterError::BadFile { path: path.to_path_buf(), reason: reason.to_string() }
}

/// Checks that `name` is one plain path component (adapters live directly inside their
/// directory).
pub fn check_name(name: &str) -> Result<(), T2IAdapterError> {
    directory::check_name_shape(name, NameShape::SingleComponent)
        .map_err(|reason| T2IAdapterError::BadName { name: name.to_string(), reason })
}

/// Every adapter directly inside `dirs`, as `(name, path)` sorted by name: folders with
/// a `config.json` (named by the folder) and `.safetensors` files (named by their stem).
/// An earlier directory wins on equal names; entries whose real path leaves their
/// directory (symlinks) are skipped.
pub fn discover(dirs: &[PathBuf]) -> Vec<(String, PathBuf)> {
    let classify = |path: &Path, _: &Path| {
        if directory::is_folder_or_safetensors(path) {
            EntryKind::Adapter
        } else {
            EntryKind::Skip
        }
    };
    directory::list_confined(dirs, 0, classify)
        .into_iter()
        .map(|listed| (listed.name, listed.real))
        .collect()
}

/// The folder or file `name` stands for in `dirs` (see [`check_name`] and the module
/// docs for what is refused).
pub fn resolve(dirs: &[PathBuf], name: &str) -> Result<PathBuf, T2IAdapterError> {
    check_name(name)?;
    let candidates = directory::folder_or_file_candidates(name);
    match directory::find_confined(dirs, &candidates, directory::is_folder_or_safetensors) {
        Ok(Some(found)) => Ok(found.real),
        Ok(None) => Err(T2IAdapterError::UnknownName(name.to_string())),
        Err(directory::Escaped) => Err(T2IAdapterError::BadName {
            name: name.to_string(),
            reason: "it links outside its T2I-Adapter directory".into(),
        }),
    }
}

/// The T2I-Adapter directories of a server or CLI run, with the loaded-adapter cache.
/// Shared by every worker (each loads onto its own device).
pub struct T2IAdapterLibrary {
    dirs: Vec<PathBuf>,
    /// Loaded adapters by weights file, device and dtype.
    cache: ModelCache<(PathBuf, DeviceLocation, DType), FileStamp, T2IAdapter>,
}

impl std::fmt::Debug for T2IAdapterLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T2IAdapterLibrary").field("dirs", &self.dirs).finish()
    }
}

impl Default for T2IAdapterLibrary {
    fn default() -> Self {
        T2IAdapterLibrary::new(Vec::new())
    }
}

impl T2IAdapterLibrary {
    pub fn new(dirs: Vec<PathBuf>) -> T2IAdapterLibrary {
        T2IAdapterLibrary { dirs, cache: ModelCache::with_capacity(CACHE_ENTRIES) }
    }

    /// The configured directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Every adapter requests can name, as [`discover`] finds them.
    pub fn list(&self) -> Vec<(String, PathBuf)> {
        discover(&self.dirs)
    }

    /// The adapter `name` stands for, loaded onto `device` in `dtype` (from the cache
    /// when its files are unchanged).
    pub fn load(
        &self,
        name: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<Arc<T2IAdapter>, T2IAdapterError> {
        let path = resolve(&self.dirs, name)?;
        let weights = weight_file(&path, dtype)?;
        let stamp = directory::file_stamp(&weights).map_err(|e| bad_file(&weights, e))?;
        let key = (weights.clone(), device.location(), dtype);
        self.cache.get_or_load(key, stamp, || load_adapter(&path, &weights, device, dtype))
    }
}

/// The weights of an adapter folder (the `fp16` variant preferred for f16) or the file
/// itself; pickles are refused.
fn weight_file(path: &Path, dtype: DType) -> Result<PathBuf, T2IAdapterError> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let plain = path.join("diffusion_pytorch_model.safetensors");
    let half = path.join("diffusion_pytorch_model.fp16.safetensors");
    let preferred = if dtype == DType::F16 { [&half, &plain] } else { [&plain, &half] };
    if let Some(found) = preferred.into_iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    if path.join("diffusion_pytorch_model.bin").exists() {
        return Err(bad_file(
            path,
            "only a pickle (diffusion_pytorch_model.bin) is there; loading pickles can run \
             arbitrary code, so convert it to .safetensors first",
        ));
    }
    Err(bad_file(path, "no diffusion_pytorch_model.safetensors in the folder"))
}

fn load_adapter(
    path: &Path,
    weights: &Path,
    device: &Device,
    dtype: DType,
) -> Result<T2IAdapter, T2IAdapterError> {
    crate::models::single_file::check_safetensors(weights).map_err(|e| bad_file(weights, e))?;
    let mut tensors = candle_core::safetensors::load(weights, device)
        .map_err(|e| bad_file(weights, crate::error::without_backtrace(e)))?;
    if !tensors.keys().any(|k| k.starts_with("adapter.")) {
        tensors = from_original_layout(tensors).map_err(|reason| bad_file(weights, reason))?;
    }
    let sidecar = if path.is_dir() {
        Some(path.join("config.json"))
    } else {
        Some(path.with_extension("config.json")).filter(|p| p.is_file())
    };
    let config: T2IAdapterConfig = match sidecar {
        Some(config_path) => {
            let text =
                std::fs::read_to_string(&config_path).map_err(|e| bad_file(&config_path, e))?;
            serde_json::from_str(&text).map_err(|e| bad_file(&config_path, e))?
        }
        None => infer_config(&tensors).map_err(|reason| bad_file(path, reason))?,
    };
    config.kind().map_err(|reason| bad_file(path, reason))?;
    let tensors = tensors
        .into_iter()
        .map(|(name, tensor)| Ok((name, tensor.to_dtype(dtype)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()
        .map_err(|e| bad_file(weights, e))?;
    let builder = VarBuilder::from_tensors(tensors, dtype, device);
    T2IAdapter::new(builder, &config).map_err(|e| {
        bad_file(
            weights,
            format!("the weights do not fit the config: {}", crate::error::without_backtrace(e)),
        )
    })
}

/// Renames the weights of TencentARC's original adapters to diffusers' names, as
/// diffusers' conversion script does. `Adapter` numbers its residual blocks through all
/// levels (`body.{level · blocks + j}.block1`, the level's projection on its first
/// block); the blocks per level are the largest count that every projection's position
/// and the total agree with (2 in every TencentARC release). `Adapter_light` keeps levels
/// (`body.{i}.body.{j}.block1`). Variants diffusers cannot run (`skep` shortcuts,
/// convolutional downsampling) are refused.
pub fn from_original_layout(
    tensors: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, String> {
    if let Some(key) = tensors.keys().find(|k| k.contains(".skep.") || k.contains(".down_opt.")) {
        return Err(format!(
            "{key}: this adapter variant (shortcut convolutions or convolutional \
             downsampling) is not supported"
        ));
    }
    if !tensors.keys().any(|k| k.starts_with("body.")) {
        return Err("neither diffusers' (adapter.…) nor TencentARC's (body.…) key names: \
                    not a T2I-Adapter"
            .into());
    }
    let light = tensors.keys().any(|k| k.contains(".out_conv."));
    let position =
        |key: &str| -> Option<usize> { key.strip_prefix("body.")?.split('.').next()?.parse().ok() };
    let blocks_per_level = if light {
        1
    } else {
        let total = tensors.keys().filter_map(|k| position(k)).max().map_or(0, |m| m + 1);
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        tensors
            .keys()
            .filter(|k| k.contains(".in_conv."))
            .filter_map(|k| position(k))
            .fold(total, gcd)
            .max(1)
    };
    let renamed = tensors
        .into_iter()
        .map(|(key, tensor)| {
            let name = match (key.strip_prefix("body."), light) {
                (None, _) => format!("adapter.{key}"),
                (Some(rest), true) => {
                    format!("adapter.body.{}", rest.replacen(".body.", ".resnets.", 1))
                }
                (Some(rest), false) => {
                    let (index, layer) = rest.split_once('.').unwrap_or((rest, ""));
                    let index: usize =
                        index.parse().map_err(|_| format!("unexpected key {key}"))?;
                    let (level, block) = (index / blocks_per_level, index % blocks_per_level);
                    if layer.starts_with("in_conv.") {
                        format!("adapter.body.{level}.{layer}")
                    } else {
                        format!("adapter.body.{level}.resnets.{block}.{layer}")
                    }
                }
            };
            Ok((name, tensor))
        })
        .collect::<Result<HashMap<_, _>, String>>()?;
    Ok(renamed)
}

/// Reads a T2I-Adapter config from diffusers-named weights: light adapters have
/// `out_conv`s; the widths come from each level's first residual block (light: its
/// `out_conv`), the unshuffle factor and input channels from the first convolution
/// (`in_channels · factor²` inputs, RGB tried before grayscale); a factor of 16 means
/// `full_adapter_xl` (every published SDXL adapter), 8 `full_adapter`.
pub fn infer_config(tensors: &HashMap<String, Tensor>) -> Result<T2IAdapterConfig, String> {
    let shape = |key: &str| tensors.get(key).map(|t| t.dims().to_vec());
    if shape("adapter.body.0.resnets.0.block1.weight").is_none() {
        return Err("no adapter.body.0.resnets.0.block1.weight: not a T2I-Adapter layout sdserve \
                    reads; add a <stem>.config.json beside it if it is one"
            .into());
    }
    let count = |prefix: &str| -> usize {
        (0..)
            .take_while(|i| tensors.keys().any(|k| k.starts_with(&format!("{prefix}{i}."))))
            .count()
    };
    let levels = count("adapter.body.");
    let num_res_blocks = count("adapter.body.0.resnets.");
    let light = tensors.contains_key("adapter.body.0.out_conv.weight");
    let first_conv = if light { "adapter.body.0.in_conv.weight" } else { "adapter.conv_in.weight" };
    let unshuffled = shape(first_conv).ok_or_else(|| format!("no {first_conv}"))?[1];
    let square_root = |n: usize| (1..=64).find(|r| r * r == n);
    let (in_channels, downscale_factor) = [3usize, 1]
        .into_iter()
        .find_map(|c| {
            (unshuffled % c == 0).then(|| square_root(unshuffled / c)).flatten().map(|r| (c, r))
        })
        .ok_or_else(|| format!("{first_conv} takes {unshuffled} channels: not 3·r² or r²"))?;
    let width_of = |level: usize| -> Result<usize, String> {
        let key = if light {
            format!("adapter.body.{level}.out_conv.weight")
        } else {
            format!("adapter.body.{level}.resnets.0.block1.weight")
        };
        shape(&key).map(|s| s[0]).ok_or_else(|| format!("no {key}"))
    };
    let widths = if light { levels.saturating_sub(1) } else { levels };
    let channels = (0..widths).map(width_of).collect::<Result<Vec<_>, _>>()?;
    let adapter_type = match (light, downscale_factor) {
        (true, _) => "light_adapter",
        (false, 16) => "full_adapter_xl",
        (false, _) => "full_adapter",
    };
    Ok(T2IAdapterConfig {
        in_channels,
        channels,
        num_res_blocks,
        downscale_factor,
        adapter_type: adapter_type.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t2i_adapters")
    }

    #[test]
    fn names_are_single_plain_components() {
        for name in ["../x", "a/b", "/etc/passwd", "..", ".", "", "C:x", "a\\b"] {
            assert!(check_name(name).is_err(), "{name:?} was accepted");
        }
        for name in ["canny", "sketch-v2", "depth.sdxl"] {
            assert!(check_name(name).is_ok(), "{name:?} was refused");
        }
    }

    #[test]
    fn discovers_folders_and_resolves_names() {
        let listed: Vec<String> = discover(&[fixtures()]).into_iter().map(|(n, _)| n).collect();
        assert_eq!(listed, ["sd1_full", "sd1_light", "sdxl_full"]);
        assert!(resolve(&[fixtures()], "sd1_full").unwrap().ends_with("sd1_full"));
        assert!(matches!(resolve(&[fixtures()], "nope"), Err(T2IAdapterError::UnknownName(_))));
        assert!(matches!(resolve(&[fixtures()], "../sd1"), Err(T2IAdapterError::BadName { .. })));
    }

    #[test]
    fn inferred_configs_match_the_fixture_configs() {
        for name in ["sd1_full", "sd1_light", "sdxl_full"] {
            let folder = fixtures().join(name);
            let tensors = candle_core::safetensors::load(
                folder.join("diffusion_pytorch_model.safetensors"),
                &Device::Cpu,
            )
            .unwrap();
            let inferred = infer_config(&tensors).unwrap();
            let text = std::fs::read_to_string(folder.join("config.json")).unwrap();
            let stored: T2IAdapterConfig = serde_json::from_str(&text).unwrap();
            assert_eq!(
                (inferred.in_channels, &inferred.channels, inferred.num_res_blocks),
                (stored.in_channels, &stored.channels, stored.num_res_blocks),
                "{name}"
            );
            assert_eq!(
                (inferred.downscale_factor, &inferred.adapter_type),
                (stored.downscale_factor, &stored.adapter_type),
                "{name}"
            );
        }
    }

    /// The fixture adapters under TencentARC's original key names load as their folders.
    #[test]
    fn original_layouts_load_as_diffusers_folders() {
        let root = std::env::temp_dir().join(format!("sdserve-t2i-orig-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        for (name, light) in [("sd1_full", false), ("sd1_light", true)] {
            let weights = fixtures().join(name).join("diffusion_pytorch_model.safetensors");
            let tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
            let original: HashMap<String, Tensor> = tensors
                .into_iter()
                .map(|(key, tensor)| {
                    let key = key.strip_prefix("adapter.").unwrap().to_string();
                    // sd1_full has one residual block per level: body.{level}.resnets.0.X
                    // and body.{level}.in_conv.X are both original block `level`.
                    let key = if light {
                        key.replace(".resnets.", ".body.")
                    } else {
                        key.replace(".resnets.0.", ".")
                    };
                    (key, tensor)
                })
                .collect();
            let file = root.join(format!("{name}_original.safetensors"));
            candle_core::safetensors::save(&original, &file).unwrap();
        }
        let originals = T2IAdapterLibrary::new(vec![root.clone()]);
        let folders = T2IAdapterLibrary::new(vec![fixtures()]);
        for (name, channels) in [("sd1_full", 3), ("sd1_light", 1)] {
            let image = Tensor::rand(0f32, 1., (1, channels, 64, 64), &Device::Cpu).unwrap();
            let original = originals.load(&format!("{name}_original"), &Device::Cpu, DType::F32);
            let a = original.unwrap().forward(&image).unwrap();
            let b = folders.load(name, &Device::Cpu, DType::F32).unwrap().forward(&image).unwrap();
            assert_eq!(a.len(), b.len(), "{name}");
            for (x, y) in a.iter().zip(&b) {
                let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
            }
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// TencentARC's SD 1.x releases: 4 levels × 2 blocks numbered 0-7, projections where
    /// the width changes (blocks 2 and 4).
    #[test]
    fn original_full_adapters_split_their_blocks_into_levels() {
        let tensor = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let mut keys = vec!["conv_in.weight".to_string()];
        keys.extend((0..8).map(|i| format!("body.{i}.block1.weight")));
        keys.extend(["body.2.in_conv.weight".into(), "body.4.in_conv.weight".into()]);
        let tensors = keys.into_iter().map(|k| (k, tensor.clone())).collect();
        let renamed = from_original_layout(tensors).unwrap();
        for key in [
            "adapter.conv_in.weight",
            "adapter.body.0.resnets.1.block1.weight",
            "adapter.body.1.in_conv.weight",
            "adapter.body.2.in_conv.weight",
            "adapter.body.3.resnets.1.block1.weight",
        ] {
            assert!(renamed.contains_key(key), "{key} missing: {:?}", renamed.keys());
        }
        let skep = [("body.0.skep.weight".to_string(), tensor)].into_iter().collect();
        assert!(from_original_layout(skep).unwrap_err().contains("not supported"));
    }

    /// A lone `.safetensors` file (config inferred from its shapes) loads as its folder.
    #[test]
    fn single_files_load_by_stem() {
        let root = std::env::temp_dir().join(format!("sdserve-t2i-file-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let weights = fixtures().join("sd1_light/diffusion_pytorch_model.safetensors");
        std::fs::copy(&weights, root.join("sketch.safetensors")).unwrap();
        let from_file = T2IAdapterLibrary::new(vec![root.clone()]);
        assert_eq!(from_file.list().len(), 1);
        let image = Tensor::rand(0f32, 1., (1, 1, 64, 64), &Device::Cpu).unwrap();
        let file_features = from_file.load("sketch", &Device::Cpu, DType::F32).unwrap();
        let folder = T2IAdapterLibrary::new(vec![fixtures()]);
        let folder_features = folder.load("sd1_light", &Device::Cpu, DType::F32).unwrap();
        let (a, b) =
            (file_features.forward(&image).unwrap(), folder_features.forward(&image).unwrap());
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            let diff =
                (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0);
        }
        // Cached: the same adapter comes back.
        let again = from_file.load("sketch", &Device::Cpu, DType::F32).unwrap();
        assert!(Arc::ptr_eq(&file_features, &again));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn symlinks_out_of_the_directory_are_refused() {
        let root = std::env::temp_dir().join(format!("sdserve-t2i-{}", std::process::id()));
        let inside = root.join("adapters");
        std::fs::create_dir_all(&inside).unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(fixtures().join("sd1_full"), inside.join("escape")).unwrap();
            assert!(matches!(
                resolve(std::slice::from_ref(&inside), "escape"),
                Err(T2IAdapterError::BadName { .. })
            ));
            assert!(discover(std::slice::from_ref(&inside)).is_empty());
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
