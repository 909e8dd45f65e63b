//! Finding ControlNets by name in the configured directories and keeping a few loaded
//! ones in a small cache.
//!
//! A ControlNet is either a diffusers folder (`config.json` + weights) or a single
//! `.safetensors` file (original `control_model.*` names; its config from a sidecar
//! `<stem>.config.json` or inferred). Requests name it by the folder's name or the
//! file's stem, relative to a directory (`sub/canny` for nested ones). Names are
//! relative paths of plain components (no `..`, absolute paths, drive or backslash
//! tricks), and the resolved path's canonical form must stay inside the directory's
//! (no symlink escape). Pickles are refused.

use std::path::{Component as PathComponent, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use candle_core::{DType, Device, DeviceLocation};
use serde::Serialize;

use crate::error::ModelError;
use crate::models::controlnet::ControlNet;
use crate::models::loader;

/// Loaded ControlNets kept per library (least recently used goes first).
pub const DEFAULT_CACHED_CONTROLNETS: usize = 4;
/// ControlNets one request may use.
pub const MAX_CONTROLNETS_PER_REQUEST: usize = 4;
/// Largest `scale` a request may give a ControlNet.
pub const MAX_CONTROLNET_SCALE: f64 = 5.0;
/// How deep [`ControlNetLibrary::list`] looks below a directory.
const MAX_LIST_DEPTH: usize = 4;

/// Why a ControlNet could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlNetError {
    #[error(
        "unknown ControlNet {0:?}: no such folder or .safetensors file in the configured \
         ControlNet directories (GET /v1/adapters lists them)"
    )]
    UnknownName(String),
    #[error("ControlNet name {name:?} is not allowed: {reason}")]
    BadName { name: String, reason: String },
    #[error("ControlNet {name:?}: {source}")]
    Load {
        name: String,
        #[source]
        source: Box<ModelError>,
    },
}

/// A ControlNet requests can name, as `GET /v1/adapters` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdapterEntry {
    /// The name requests use.
    pub name: String,
    /// Where it is on the server.
    pub path: PathBuf,
}

/// Checks that `name` is a relative path of plain components.
pub fn check_name(name: &str) -> Result<(), ControlNetError> {
    let refuse =
        |reason: &str| ControlNetError::BadName { name: name.to_string(), reason: reason.into() };
    if name.trim().is_empty() {
        return Err(refuse("it is empty"));
    }
    if name.contains('\\') || name.contains('\0') || name.contains(':') {
        return Err(refuse("it may not contain '\\', ':' or NUL"));
    }
    let path = Path::new(name);
    if path.is_absolute() || name.starts_with('/') {
        return Err(refuse("absolute paths are not allowed; use a name from GET /v1/adapters"));
    }
    if !path.components().all(|c| matches!(c, PathComponent::Normal(_))) {
        return Err(refuse("'..' and '.' path components are not allowed"));
    }
    if crate::adapters::lora::is_pickle(path) {
        return Err(refuse("pickle files (.ckpt/.bin/.pt/.pth) are not loaded; use .safetensors"));
    }
    Ok(())
}

struct CacheEntry {
    path: PathBuf,
    location: DeviceLocation,
    dtype: DType,
    stamp: Option<SystemTime>,
    model: Arc<ControlNet>,
}

/// The ControlNet directories a server or CLI run knows, with the loaded-model cache.
pub struct ControlNetLibrary {
    dirs: Vec<PathBuf>,
    capacity: usize,
    cache: Mutex<Vec<CacheEntry>>,
}

impl std::fmt::Debug for ControlNetLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlNetLibrary")
            .field("dirs", &self.dirs)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Default for ControlNetLibrary {
    fn default() -> Self {
        ControlNetLibrary::new(Vec::new(), DEFAULT_CACHED_CONTROLNETS)
    }
}

/// Whether `path` is something a ControlNet loads from.
fn is_controlnet(path: &Path) -> bool {
    if path.is_dir() {
        path.join("config.json").is_file()
    } else {
        path.is_file() && path.extension().is_some_and(|e| e == "safetensors")
    }
}

impl ControlNetLibrary {
    /// A library over `dirs` keeping at most `capacity` loaded models.
    pub fn new(dirs: Vec<PathBuf>, capacity: usize) -> ControlNetLibrary {
        ControlNetLibrary { dirs, capacity, cache: Mutex::new(Vec::new()) }
    }

    /// The configured directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The folder or file `name` stands for; see the module docs for what is refused.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, ControlNetError> {
        check_name(name)?;
        let stem = name.strip_suffix(".safetensors").unwrap_or(name);
        for dir in &self.dirs {
            let Ok(root) = dir.canonicalize() else {
                continue;
            };
            for candidate in [dir.join(stem), dir.join(format!("{stem}.safetensors"))] {
                if !is_controlnet(&candidate) {
                    continue;
                }
                let Ok(real) = candidate.canonicalize() else {
                    continue;
                };
                if !real.starts_with(&root) {
                    return Err(ControlNetError::BadName {
                        name: name.to_string(),
                        reason: "it links to a path outside its ControlNet directory".into(),
                    });
                }
                return Ok(real);
            }
        }
        Err(ControlNetError::UnknownName(name.to_string()))
    }

    /// Every ControlNet the library can resolve, sorted by name (an earlier directory
    /// wins on equal names).
    pub fn list(&self) -> Vec<AdapterEntry> {
        let mut found: std::collections::BTreeMap<String, PathBuf> = Default::default();
        for dir in &self.dirs {
            let Ok(root) = dir.canonicalize() else {
                continue;
            };
            let mut pending = vec![(dir.clone(), 0usize)];
            while let Some((folder, depth)) = pending.pop() {
                let Ok(entries) = std::fs::read_dir(&folder) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let path = entry.path();
                    let Ok(real) = path.canonicalize() else {
                        continue;
                    };
                    if !real.starts_with(&root) {
                        continue;
                    }
                    let Ok(relative) = path.strip_prefix(dir) else {
                        continue;
                    };
                    let name = relative
                        .with_extension("")
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join("/");
                    if is_controlnet(&path) {
                        found.entry(name).or_insert(path);
                    } else if real.is_dir() && depth < MAX_LIST_DEPTH {
                        pending.push((path, depth + 1));
                    }
                }
            }
        }
        found.into_iter().map(|(name, path)| AdapterEntry { name, path }).collect()
    }

    /// The ControlNet `name` stands for, loaded in `dtype` on `device`; from the cache
    /// when its files are unchanged.
    pub fn load(
        &self,
        name: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<Arc<ControlNet>, ControlNetError> {
        let path = self.resolve(name)?;
        let stamp = modified(&path);
        let location = device.location();
        let same = |entry: &CacheEntry| {
            entry.path == path && entry.location == location && entry.dtype == dtype
        };
        {
            let mut cache =
                self.cache.lock().expect("ControlNet cache lock poisoned; this is a bug");
            if let Some(index) = cache.iter().position(|e| same(e) && e.stamp == stamp) {
                let entry = cache.remove(index);
                let model = entry.model.clone();
                cache.push(entry);
                return Ok(model);
            }
        }
        let started = std::time::Instant::now();
        let model = Arc::new(loader::load_controlnet(&path, device, dtype).map_err(|source| {
            ControlNetError::Load { name: name.to_string(), source: Box::new(source) }
        })?);
        tracing::info!(
            controlnet = name,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "ControlNet loaded"
        );
        let mut cache = self.cache.lock().expect("ControlNet cache lock poisoned; this is a bug");
        cache.retain(|entry| !same(entry));
        if self.capacity > 0 {
            while cache.len() >= self.capacity {
                cache.remove(0);
            }
            cache.push(CacheEntry { path, location, dtype, stamp, model: model.clone() });
        }
        Ok(model)
    }
}

/// When the weights last changed: the file's time, or for a folder the newest of its
/// config and weight files.
fn modified(path: &Path) -> Option<SystemTime> {
    let time = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if path.is_dir() {
        std::fs::read_dir(path).ok()?.flatten().filter_map(|entry| time(&entry.path())).max()
    } else {
        time(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/controlnets")
    }

    #[test]
    fn traversal_and_absolute_names_are_refused() {
        for name in ["../x", "a/../../x", "/etc/passwd", "..", "./x", "a\\b", "C:x", "", "x.pth"] {
            assert!(check_name(name).is_err(), "{name:?} was accepted");
        }
        for name in ["canny", "sub/canny", "canny.v2"] {
            assert!(check_name(name).is_ok(), "{name:?} was refused");
        }
    }

    #[test]
    fn folders_and_single_files_are_listed_and_resolved() {
        let library = ControlNetLibrary::new(vec![fixtures().join("sd1")], 2);
        let names: Vec<String> = library.list().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["tiny_depth", "tiny_edges", "tiny_edges_single"]);
        assert!(library.resolve("tiny_edges").unwrap().is_dir());
        assert!(library.resolve("tiny_edges_single").unwrap().is_file());
        assert!(matches!(library.resolve("missing"), Err(ControlNetError::UnknownName(_))));
        assert!(matches!(library.resolve("../sdxl/tiny_xl"), Err(ControlNetError::BadName { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_out_of_the_directory_are_refused() {
        let root = std::env::temp_dir().join(format!("sdserve-controlnet-{}", std::process::id()));
        let inside = root.join("controlnets");
        std::fs::create_dir_all(&inside).unwrap();
        std::os::unix::fs::symlink(fixtures().join("sd1/tiny_edges"), inside.join("escape"))
            .unwrap();
        let library = ControlNetLibrary::new(vec![inside], 1);
        assert!(matches!(library.resolve("escape"), Err(ControlNetError::BadName { .. })));
        assert!(library.list().is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
