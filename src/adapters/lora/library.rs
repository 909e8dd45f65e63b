//! Finding LoRA files by name and keeping parsed ones in a memory-bounded cache.
//!
//! A name resolves only to a `.safetensors` file inside one of the configured
//! directories: names are relative paths of plain components (no `..`, no absolute
//! paths, no drive or backslash tricks), and the resolved file's canonical path must
//! still lie inside the directory's canonical path (no symlink escape). The `generate`
//! CLI may also register individual files, named by their stem.

use std::collections::BTreeMap;
use std::path::{Component as PathComponent, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use super::{is_pickle, read_metadata, LoraError, LoraFile};

/// A LoRA that requests can name, as `GET /v1/loras` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct LoraInfo {
    /// The name to use in `loras` and `<lora:name:weight>`.
    pub name: String,
    /// The file's safetensors `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

struct CacheEntry {
    path: PathBuf,
    stamp: (Option<SystemTime>, u64),
    file: Arc<LoraFile>,
}

/// Parsed files, least recently used first.
#[derive(Default)]
struct Cache {
    entries: Vec<CacheEntry>,
    bytes: usize,
}

/// The LoRA directories and files a server or CLI run knows, with the parsed-file cache.
pub struct LoraLibrary {
    dirs: Vec<PathBuf>,
    files: BTreeMap<String, PathBuf>,
    cache_limit_bytes: usize,
    cache: Mutex<Cache>,
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
    let refuse =
        |reason: &str| LoraError::BadName { name: name.to_string(), reason: reason.into() };
    if name.trim().is_empty() {
        return Err(refuse("it is empty"));
    }
    if name.contains('\\') || name.contains('\0') || name.contains(':') {
        return Err(refuse("it may not contain '\\', ':' or NUL"));
    }
    let path = Path::new(name);
    if path.is_absolute() || name.starts_with('/') {
        return Err(refuse("absolute paths are not allowed; use a name inside a LoRA directory"));
    }
    if !path.components().all(|c| matches!(c, PathComponent::Normal(_))) {
        return Err(refuse("'..' and '.' path components are not allowed"));
    }
    if is_pickle(path) {
        return Err(LoraError::PickleRefused(path.to_path_buf()));
    }
    Ok(())
}

impl LoraLibrary {
    /// A library over `dirs` whose cache holds at most `cache_mb` MiB of parsed tensors.
    pub fn new(dirs: Vec<PathBuf>, cache_mb: usize) -> LoraLibrary {
        LoraLibrary {
            dirs,
            files: BTreeMap::new(),
            cache_limit_bytes: cache_mb.saturating_mul(1024 * 1024),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Registers one file (the CLI's `--lora FILE`) under its stem; returns the name.
    pub fn add_file(&mut self, path: &Path) -> Result<String, LoraError> {
        if is_pickle(path) {
            return Err(LoraError::PickleRefused(path.to_path_buf()));
        }
        if !path.is_file() {
            return Err(LoraError::BadFile {
                path: path.to_path_buf(),
                reason: "no such file".into(),
            });
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| LoraError::BadFile {
                path: path.to_path_buf(),
                reason: "the file name is not valid UTF-8".into(),
            })?
            .to_string();
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
        let file_name = if name.ends_with(".safetensors") {
            name.to_string()
        } else {
            format!("{name}.safetensors")
        };
        for dir in &self.dirs {
            let candidate = dir.join(&file_name);
            if !candidate.is_file() {
                continue;
            }
            let (Ok(real), Ok(root)) = (candidate.canonicalize(), dir.canonicalize()) else {
                continue;
            };
            if !real.starts_with(&root) {
                return Err(LoraError::BadName {
                    name: name.to_string(),
                    reason: "it links to a file outside its LoRA directory".into(),
                });
            }
            return Ok(real);
        }
        Err(LoraError::UnknownName(name.to_string()))
    }

    /// Every LoRA the library can resolve, sorted by name, with its metadata.
    pub fn list(&self) -> Vec<LoraInfo> {
        let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
        for dir in &self.dirs {
            let Ok(root) = dir.canonicalize() else {
                continue;
            };
            let mut pending = vec![(root.clone(), 0usize)];
            while let Some((folder, depth)) = pending.pop() {
                let Ok(entries) = std::fs::read_dir(&folder) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let Ok(real) = entry.path().canonicalize() else {
                        continue;
                    };
                    if !real.starts_with(&root) {
                        continue;
                    }
                    if real.is_dir() && depth < 8 {
                        pending.push((entry.path(), depth + 1));
                    } else if real.is_file()
                        && entry.path().extension().is_some_and(|e| e == "safetensors")
                    {
                        let relative = entry.path().strip_prefix(&root).map(Path::to_path_buf);
                        let Ok(relative) = relative else {
                            continue;
                        };
                        let name = relative
                            .with_extension("")
                            .components()
                            .map(|c| c.as_os_str().to_string_lossy().into_owned())
                            .collect::<Vec<_>>()
                            .join("/");
                        found.entry(name).or_insert(real);
                    }
                }
            }
        }
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
        let stamp = std::fs::metadata(&path)
            .map(|m| (m.modified().ok(), m.len()))
            .map_err(|e| LoraError::BadFile { path: path.clone(), reason: e.to_string() })?;
        {
            let mut cache = self.cache.lock().expect("LoRA cache lock poisoned; this is a bug");
            if let Some(index) =
                cache.entries.iter().position(|e| e.path == path && e.stamp == stamp)
            {
                let entry = cache.entries.remove(index);
                let file = entry.file.clone();
                cache.entries.push(entry);
                return Ok(file);
            }
        }
        let file = Arc::new(LoraFile::read(&path)?);
        let mut cache = self.cache.lock().expect("LoRA cache lock poisoned; this is a bug");
        if let Some(index) = cache.entries.iter().position(|e| e.path == path) {
            let stale = cache.entries.remove(index);
            cache.bytes -= stale.file.bytes;
        }
        if file.bytes <= self.cache_limit_bytes {
            while cache.bytes + file.bytes > self.cache_limit_bytes && !cache.entries.is_empty() {
                let evicted = cache.entries.remove(0);
                cache.bytes -= evicted.file.bytes;
            }
            cache.bytes += file.bytes;
            cache.entries.push(CacheEntry { path, stamp, file: file.clone() });
        }
        Ok(file)
    }

    /// Bytes of parsed tensors the cache holds now.
    pub fn cached_bytes(&self) -> usize {
        self.cache.lock().expect("LoRA cache lock poisoned; this is a bug").bytes
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
