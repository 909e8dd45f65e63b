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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use candle_core::{DType, Device, DeviceLocation};
use serde::Serialize;

use crate::adapters::directory::{self, EntryKind, ModelCache, NameShape};
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
    let refuse = |reason: String| ControlNetError::BadName { name: name.to_string(), reason };
    let shape = NameShape::RelativePath { absolute_hint: "use a name from GET /v1/adapters" };
    directory::check_name_shape(name, shape).map_err(refuse)?;
    if crate::adapters::lora::is_pickle(Path::new(name)) {
        return Err(refuse(
            "pickle files (.ckpt/.bin/.pt/.pth) are not loaded; use .safetensors".into(),
        ));
    }
    Ok(())
}

/// Loaded ControlNets by path, device and dtype; valid while their files are unchanged.
type Cache = ModelCache<(PathBuf, DeviceLocation, DType), Option<SystemTime>, ControlNet>;

/// The ControlNet directories a server or CLI run knows, with the loaded-model cache.
pub struct ControlNetLibrary {
    dirs: Vec<PathBuf>,
    capacity: usize,
    cache: Cache,
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

impl ControlNetLibrary {
    /// A library over `dirs` keeping at most `capacity` loaded models.
    pub fn new(dirs: Vec<PathBuf>, capacity: usize) -> ControlNetLibrary {
        ControlNetLibrary { dirs, capacity, cache: ModelCache::with_capacity(capacity) }
    }

    /// The configured directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The folder or file `name` stands for; see the module docs for what is refused.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, ControlNetError> {
        check_name(name)?;
        let candidates = directory::folder_or_file_candidates(name);
        match directory::find_confined(&self.dirs, &candidates, directory::is_folder_or_safetensors)
        {
            Ok(Some(found)) => Ok(found.real),
            Ok(None) => Err(ControlNetError::UnknownName(name.to_string())),
            Err(directory::Escaped) => Err(ControlNetError::BadName {
                name: name.to_string(),
                reason: "it links to a path outside its ControlNet directory".into(),
            }),
        }
    }

    /// Every ControlNet the library can resolve, sorted by name (an earlier directory
    /// wins on equal names).
    pub fn list(&self) -> Vec<AdapterEntry> {
        directory::list_confined(&self.dirs, MAX_LIST_DEPTH, classify_entry)
            .into_iter()
            .map(|listed| AdapterEntry { name: listed.name, path: listed.path })
            .collect()
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
        let key = (path.clone(), device.location(), dtype);
        self.cache.get_or_load(key, stamp, || {
            let started = std::time::Instant::now();
            let model = loader::load_controlnet(&path, device, dtype).map_err(|source| {
                ControlNetError::Load { name: name.to_string(), source: Box::new(source) }
            })?;
            tracing::info!(
                controlnet = name,
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "ControlNet loaded"
            );
            Ok(model)
        })
    }
}

/// What a directory entry is to [`ControlNetLibrary::list`]: a ControlNet, or a folder
/// that may hold some.
fn classify_entry(path: &Path, real: &Path) -> EntryKind {
    if directory::is_folder_or_safetensors(path) {
        EntryKind::Adapter
    } else if real.is_dir() {
        EntryKind::Folder
    } else {
        EntryKind::Skip
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
