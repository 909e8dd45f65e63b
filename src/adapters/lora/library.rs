//! Finding LoRA files by name and keeping parsed ones in a memory-bounded cache.
//!
//! A name resolves only to a `.safetensors` file inside one of the configured
//! directories: names are relative paths of plain components (no `..`, no absolute
//! paths, no drive or backslash tricks), and the resolved file's canonical path must
//! still lie inside the directory's canonical path (no symlink escape). The `generate`
//! CLI may also register individual files, named by their stem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::{is_pickle, read_metadata, LoraError, LoraFile};
use crate::adapters::directory::{self, EntryKind, FileStamp, ModelCache, NameShape};

/// A LoRA that requests can name, as `GET /v1/loras` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct LoraInfo {
    /// The name to use in `loras` and `<lora:name:weight>`.
    pub name: String,
    /// The file's safetensors `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

/// How deep [`LoraLibrary::list`] looks below a directory.
const MAX_LIST_DEPTH: usize = 8;

/// The LoRA directories and files a server or CLI run knows, with the parsed-file cache.
pub struct LoraLibrary {
    dirs: Vec<PathBuf>,
    files: BTreeMap<String, PathBuf>,
    cache_limit_bytes: usize,
    /// Parsed files by path, weighed by their tensors' bytes.
    cache: ModelCache<PathBuf, FileStamp, LoraFile>,
}

impl std::fmt::Debug for LoraLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraLibrary")
            .field("dirs", &self.dirs)
            .field("files", &self.files)
            .field("cache_limit_bytes", &self.cache_limit_bytes)
            .finish()
    }
}

impl Default for LoraLibrary {
    fn default() -> Self {
        LoraLibrary::new(Vec::new(), 512)
    }
}

/// Checks that `name` is a relative path of plain components.
pub fn check_name(name: &str) -> Result<(), LoraError> {
    let shape = NameShape::RelativePath { absolute_hint: "use a name inside a LoRA directory" };
    directory::check_name_shape(name, shape)
        .map_err(|reason| LoraError::BadName { name: name.to_string(), reason })?;
    let path = Path::new(name);
    if is_pickle(path) {
        return Err(LoraError::PickleRefused(path.to_path_buf()));
    }
    Ok(())
}

impl LoraLibrary {
    /// A library over `dirs` whose cache holds at most `cache_mb` MiB of parsed tensors.
    pub fn new(dirs: Vec<PathBuf>, cache_mb: usize) -> LoraLibrary {
        let cache_limit_bytes = cache_mb.saturating_mul(1024 * 1024);
        LoraLibrary {
            dirs,
            files: BTreeMap::new(),
            cache_limit_bytes,
            cache: ModelCache::weighted(cache_limit_bytes, |file: &LoraFile| file.bytes),
        }
    }

    /// Registers one file (the CLI's `--lora FILE`) under its stem; returns the name.
    pub fn add_file(&mut self, path: &Path) -> Result<String, LoraError> {
        if is_pickle(path) {
            return Err(LoraError::PickleRefused(path.to_path_buf()));
        }
        let bad_file =
            |reason: &str| LoraError::BadFile { path: path.to_path_buf(), reason: reason.into() };
        if !path.is_file() {
            return Err(bad_file("no such file"));
        }
        let name = directory::stem_name(path).map_err(bad_file)?;
        self.files.insert(name.clone(), path.to_path_buf());
        Ok(name)
    }

    /// The configured directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The file `name` stands for; see the module docs for what is refused.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, LoraError> {
        if let Some(path) = self.files.get(name) {
            return Ok(path.clone());
        }
        check_name(name)?;
        let candidates = [directory::safetensors_file_name(name)];
        match directory::find_confined(&self.dirs, &candidates, Path::is_file) {
            Ok(Some(found)) => Ok(found.real),
            Ok(None) => Err(LoraError::UnknownName(name.to_string())),
            Err(directory::Escaped) => Err(LoraError::BadName {
                name: name.to_string(),
                reason: "it links to a file outside its LoRA directory".into(),
            }),
        }
    }

    /// Every LoRA the library can resolve, sorted by name, with its metadata.
    pub fn list(&self) -> Vec<LoraInfo> {
        let classify = |path: &Path, real: &Path| {
            if real.is_dir() {
                EntryKind::Folder
            } else if real.is_file() && directory::has_safetensors_extension(path) {
                EntryKind::Adapter
            } else {
                EntryKind::Skip
            }
        };
        let mut found: BTreeMap<String, PathBuf> =
            directory::list_confined(&self.dirs, MAX_LIST_DEPTH, classify)
                .into_iter()
                .map(|listed| (listed.name, listed.real))
                .collect();
        for (name, path) in &self.files {
            found.entry(name.clone()).or_insert(path.clone());
        }
        found
            .into_iter()
            .map(|(name, path)| LoraInfo {
                metadata: read_metadata(&path).unwrap_or_default(),
                name,
            })
            .collect()
    }

    /// The parsed file `name` stands for, from the cache when its file is unchanged.
    pub fn load(&self, name: &str) -> Result<Arc<LoraFile>, LoraError> {
        let path = self.resolve(name)?;
        let stamp = directory::file_stamp(&path)
            .map_err(|e| LoraError::BadFile { path: path.clone(), reason: e.to_string() })?;
        self.cache.get_or_load(path.clone(), stamp, || LoraFile::read(&path))
    }

    /// Bytes of parsed tensors the cache holds now.
    pub fn cached_bytes(&self) -> usize {
        self.cache.held()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_and_absolute_names_are_refused() {
        for name in
            ["../x", "a/../../x", "/etc/passwd", "..", "./x", "a\\..\\b", "C:x", "", "x.ckpt"]
        {
            assert!(check_name(name).is_err(), "{name:?} was accepted");
        }
        for name in ["style", "sub/style", "style.v2"] {
            assert!(check_name(name).is_ok(), "{name:?} was refused");
        }
    }

    #[test]
    fn symlinks_out_of_the_directory_are_refused() {
        let root = std::env::temp_dir().join(format!("sdserve-lora-{}", std::process::id()));
        let inside = root.join("loras");
        let outside = root.join("secret");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("x.safetensors"), b"not really").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(
            outside.join("x.safetensors"),
            inside.join("escape.safetensors"),
        )
        .unwrap();
        let library = LoraLibrary::new(vec![inside.clone()], 16);
        #[cfg(unix)]
        assert!(matches!(library.resolve("escape"), Err(LoraError::BadName { .. })));
        assert!(matches!(library.resolve("missing"), Err(LoraError::UnknownName(_))));
        assert!(library.list().iter().all(|info| info.name != "escape"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
