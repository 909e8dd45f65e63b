//! What the adapter libraries (LoRA, ControlNet, T2I-Adapter, IP-Adapter, embeddings)
//! share about their configured directories: checking user-supplied names, resolving a
//! name to a path confined to its directory, listing what a directory holds, and the
//! small least-recently-used cache of loaded models.
//!
//! Confinement: a name is checked as text first (no `..`, `.`, absolute paths, drive or
//! backslash tricks), then the resolved path's canonical form must still lie inside the
//! directory's canonical form, so a symlink cannot lead out. Each library words its own
//! errors (they name the library and its field); this module only says why.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The extension every adapter weights file has.
pub const SAFETENSORS: &str = "safetensors";

/// Which names a library accepts.
#[derive(Debug, Clone, Copy)]
pub enum NameShape {
    /// A relative path of plain components (`style`, `sub/style`); `absolute_hint` ends
    /// the refusal of absolute paths (where to find valid names).
    RelativePath { absolute_hint: &'static str },
    /// One plain component: the adapter lies directly inside its directory.
    SingleComponent,
}

/// Why `name` is not an acceptable adapter name of `shape`, as a user-facing reason.
pub fn check_name_shape(name: &str, shape: NameShape) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("it is empty".into());
    }
    match shape {
        NameShape::RelativePath { absolute_hint } => {
            if name.contains(['\\', ':', '\0']) {
                return Err("it may not contain '\\', ':' or NUL".into());
            }
            let path = Path::new(name);
            if path.is_absolute() || name.starts_with('/') {
                return Err(format!("absolute paths are not allowed; {absolute_hint}"));
            }
            if !path.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err("'..' and '.' path components are not allowed".into());
            }
            Ok(())
        }
        NameShape::SingleComponent => {
            if name.contains(['/', '\\', ':', '\0']) {
                return Err("it may not contain '/', '\\', ':' or NUL".into());
            }
            let mut components = Path::new(name).components();
            match (components.next(), components.next()) {
                (Some(Component::Normal(_)), None) => Ok(()),
                _ => Err("'.' and '..' are not allowed".into()),
            }
        }
    }
}

/// `name` as a `.safetensors` file name (unchanged when it already ends so).
pub fn safetensors_file_name(name: &str) -> String {
    if name.ends_with(".safetensors") {
        name.to_string()
    } else {
        format!("{name}.{SAFETENSORS}")
    }
}

/// The two places a folder-or-file adapter `name` may be: the folder `stem` and the file
/// `stem.safetensors`, in that order.
pub fn folder_or_file_candidates(name: &str) -> [String; 2] {
    let stem = name.strip_suffix(".safetensors").unwrap_or(name);
    [stem.to_string(), format!("{stem}.{SAFETENSORS}")]
}

/// Whether `path` has the `.safetensors` extension (as written; the file need not exist).
pub fn has_safetensors_extension(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == SAFETENSORS)
}

/// Whether `path` is a diffusers folder (with `config.json`) or a `.safetensors` file:
/// the two shapes ControlNets and T2I-Adapters come in.
pub fn is_folder_or_safetensors(path: &Path) -> bool {
    if path.is_dir() {
        path.join("config.json").is_file()
    } else {
        path.is_file() && has_safetensors_extension(path)
    }
}

/// A name resolved inside one of the directories.
#[derive(Debug, Clone)]
pub struct Confined {
    /// The path as joined onto the configured directory.
    pub candidate: PathBuf,
    /// Its canonical form (inside `root`).
    pub real: PathBuf,
    /// The directory's canonical form.
    pub root: PathBuf,
}

/// The first match of a name led out of its directory (a symlink escape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Escaped;

/// Looks for `candidates` (paths relative to a directory, already checked with
/// [`check_name_shape`]) in `dirs`, in order: directory by directory, candidate by
/// candidate, the first one `accepts` takes wins. `Ok(None)` when none is there;
/// `Err(Escaped)` when the first match's canonical path leaves its directory (later
/// directories are not tried then: the name is refused, not shadowed).
pub fn find_confined(
    dirs: &[PathBuf],
    candidates: &[String],
    accepts: impl Fn(&Path) -> bool,
) -> Result<Option<Confined>, Escaped> {
    for dir in dirs {
        let Ok(root) = dir.canonicalize() else {
            continue;
        };
        for relative in candidates {
            let candidate = dir.join(relative);
            if !accepts(&candidate) {
                continue;
            }
            let Ok(real) = candidate.canonicalize() else {
                continue;
            };
            if !real.starts_with(&root) {
                return Err(Escaped);
            }
            return Ok(Some(Confined { candidate, real, root }));
        }
    }
    Ok(None)
}

/// What [`list_confined`] makes of one directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// An adapter, listed under its name.
    Adapter,
    /// A folder to look into (within the depth limit).
    Folder,
    /// Neither.
    Skip,
}

/// One adapter [`list_confined`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The name requests use: the path below the directory with `/` separators, without
    /// the file's extension (a folder keeps its whole name).
    pub name: String,
    /// The path as joined onto the configured directory.
    pub path: PathBuf,
    /// Its canonical form.
    pub real: PathBuf,
}

/// Every adapter below `dirs`, sorted by name (an earlier directory wins on equal
/// names). `classify(path, real)` says what an entry is; folders are entered down to
/// `max_depth` levels below the directory (0: the top level only). Entries whose
/// canonical path leaves their directory (symlinks) are skipped.
pub fn list_confined(
    dirs: &[PathBuf],
    max_depth: usize,
    classify: impl Fn(&Path, &Path) -> EntryKind,
) -> Vec<Listed> {
    let mut found: BTreeMap<String, Listed> = BTreeMap::new();
    for dir in dirs {
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
                match classify(&path, &real) {
                    EntryKind::Adapter => {
                        let Ok(relative) = path.strip_prefix(dir) else {
                            continue;
                        };
                        let relative = if real.is_dir() {
                            relative.to_path_buf()
                        } else {
                            relative.with_extension("")
                        };
                        let name = relative
                            .components()
                            .map(|c| c.as_os_str().to_string_lossy().into_owned())
                            .collect::<Vec<_>>()
                            .join("/");
                        found.entry(name.clone()).or_insert(Listed { name, path, real });
                    }
                    EntryKind::Folder if depth < max_depth => pending.push((path, depth + 1)),
                    EntryKind::Folder | EntryKind::Skip => {}
                }
            }
        }
    }
    found.into_values().collect()
}

/// The file stem of `path`, the name a file registered directly (CLI flags) goes by.
pub fn stem_name(path: &Path) -> Result<String, &'static str> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_string)
        .ok_or("the file name is not valid UTF-8")
}

/// When a file last changed and its length: a cached model is reused only while both
/// are unchanged.
pub type FileStamp = (Option<SystemTime>, u64);

/// The [`FileStamp`] of `path`.
pub fn file_stamp(path: &Path) -> std::io::Result<FileStamp> {
    let metadata = std::fs::metadata(path)?;
    Ok((metadata.modified().ok(), metadata.len()))
}

struct CacheEntries<K, S, V> {
    /// Least recently used first.
    entries: Vec<(K, S, Arc<V>)>,
    /// Total weight of `entries`.
    held: usize,
}

/// A small least-recently-used cache of loaded models, keyed by `K` (a resolved path,
/// with the device and dtype where models differ by them) and valid while the stamp
/// `S` (when the files last changed) is unchanged. It holds at most `capacity` units of
/// `weight` (1 per model, or bytes); a model heavier than that is not kept.
pub struct ModelCache<K, S, V> {
    entries: Mutex<CacheEntries<K, S, V>>,
    capacity: usize,
    weight: fn(&V) -> usize,
}

impl<K, S, V> std::fmt::Debug for ModelCache<K, S, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCache")
            .field("capacity", &self.capacity)
            .field("held", &self.held())
            .finish()
    }
}

const POISONED: &str = "adapter cache lock poisoned; this is a bug";

impl<K: PartialEq, S: PartialEq, V> ModelCache<K, S, V> {
    /// A cache holding at most `capacity` models.
    pub fn with_capacity(capacity: usize) -> Self {
        ModelCache::weighted(capacity, |_| 1)
    }

    /// A cache holding models of at most `capacity` total `weight`.
    pub fn weighted(capacity: usize, weight: fn(&V) -> usize) -> Self {
        ModelCache {
            entries: Mutex::new(CacheEntries { entries: Vec::new(), held: 0 }),
            capacity,
            weight,
        }
    }

    /// The model cached under `key` with `stamp`, now the most recently used.
    pub fn get(&self, key: &K, stamp: &S) -> Option<Arc<V>> {
        let mut cache = self.entries.lock().expect(POISONED);
        let index = cache.entries.iter().position(|(k, s, _)| k == key && s == stamp)?;
        let entry = cache.entries.remove(index);
        let value = entry.2.clone();
        cache.entries.push(entry);
        Some(value)
    }

    /// Keeps `value` under `key` (replacing an older stamp's), evicting the least
    /// recently used models until it fits.
    pub fn insert(&self, key: K, stamp: S, value: Arc<V>) {
        let weight = self.weight;
        let mut cache = self.entries.lock().expect(POISONED);
        if let Some(index) = cache.entries.iter().position(|(k, _, _)| *k == key) {
            let stale = cache.entries.remove(index);
            cache.held -= weight(&stale.2);
        }
        let needed = weight(&value);
        if needed > self.capacity {
            return;
        }
        while cache.held + needed > self.capacity && !cache.entries.is_empty() {
            let evicted = cache.entries.remove(0);
            cache.held -= weight(&evicted.2);
        }
        cache.held += needed;
        cache.entries.push((key, stamp, value));
    }

    /// The cached model under `key` with `stamp`, or the one `load` makes (then cached).
    /// The lock is not held while loading.
    pub fn get_or_load<E>(
        &self,
        key: K,
        stamp: S,
        load: impl FnOnce() -> Result<V, E>,
    ) -> Result<Arc<V>, E> {
        if let Some(value) = self.get(&key, &stamp) {
            return Ok(value);
        }
        let value = Arc::new(load()?);
        self.insert(key, stamp, value.clone());
        Ok(value)
    }
}

impl<K, S, V> ModelCache<K, S, V> {
    /// The total weight held now.
    pub fn held(&self) -> usize {
        self.entries.lock().expect(POISONED).held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_path_names_refuse_traversal() {
        let shape = NameShape::RelativePath { absolute_hint: "hint" };
        for name in ["../x", "a/../../x", "/etc/passwd", "..", "./x", "a\\b", "C:x", "", " "] {
            assert!(check_name_shape(name, shape).is_err(), "{name:?} was accepted");
        }
        for name in ["style", "sub/style", "style.v2"] {
            assert!(check_name_shape(name, shape).is_ok(), "{name:?} was refused");
        }
        let absolute = check_name_shape("/x", shape).unwrap_err();
        assert_eq!(absolute, "absolute paths are not allowed; hint");
    }

    #[test]
    fn single_component_names_refuse_separators() {
        for name in ["a/b", "..", ".", "a\\b", "C:x", ""] {
            assert!(check_name_shape(name, NameShape::SingleComponent).is_err(), "{name:?}");
        }
        assert!(check_name_shape("depth.sdxl", NameShape::SingleComponent).is_ok());
    }

    /// Folders keep their whole name (dots included) and resolve by it; files are named
    /// by their stem, nested ones by their path; entries leaving the directory are skipped
    /// in lists and refused in lookups.
    #[test]
    fn listing_and_lookup_agree_on_names() {
        let root =
            std::env::temp_dir().join(format!("sdserve-adapter-dirs-{}", std::process::id()));
        let dir = root.join("adapters");
        std::fs::create_dir_all(dir.join("canny.v2")).unwrap();
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::create_dir_all(root.join("outside")).unwrap();
        std::fs::write(dir.join("canny.v2/config.json"), b"{}").unwrap();
        std::fs::write(dir.join("depth.safetensors"), b"x").unwrap();
        std::fs::write(dir.join("sub/style.safetensors"), b"x").unwrap();
        std::fs::write(root.join("outside/config.json"), b"{}").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(root.join("outside"), dir.join("escape")).unwrap();
        let dirs = std::slice::from_ref(&dir);
        let classify = |path: &Path, real: &Path| {
            if is_folder_or_safetensors(path) {
                EntryKind::Adapter
            } else if real.is_dir() {
                EntryKind::Folder
            } else {
                EntryKind::Skip
            }
        };
        let names: Vec<String> =
            list_confined(dirs, 1, classify).into_iter().map(|listed| listed.name).collect();
        assert_eq!(names, ["canny.v2", "depth", "sub/style"]);
        assert!(list_confined(dirs, 0, classify).iter().all(|listed| listed.name != "sub/style"));
        for name in names {
            let candidates = folder_or_file_candidates(&name);
            let found = find_confined(dirs, &candidates, is_folder_or_safetensors);
            assert!(found.unwrap().is_some(), "{name} does not resolve");
        }
        let missing = find_confined(dirs, &folder_or_file_candidates("nope"), Path::exists);
        assert!(missing.unwrap().is_none());
        #[cfg(unix)]
        assert_eq!(
            find_confined(dirs, &folder_or_file_candidates("escape"), is_folder_or_safetensors)
                .unwrap_err(),
            Escaped
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_cache_evicts_least_recently_used_by_weight() {
        let cache: ModelCache<&str, u8, usize> = ModelCache::weighted(10, |v| *v);
        cache.insert("a", 0, Arc::new(4));
        cache.insert("b", 0, Arc::new(4));
        assert!(cache.get(&"a", &0).is_some());
        cache.insert("c", 0, Arc::new(4));
        assert!(cache.get(&"b", &0).is_none(), "b was least recently used");
        assert!(cache.get(&"a", &1).is_none(), "a changed stamp is a miss");
        assert_eq!(cache.held(), 8);
        cache.insert("a", 1, Arc::new(2));
        assert_eq!(cache.held(), 6, "the stale a was replaced");
        cache.insert("huge", 0, Arc::new(11));
        assert_eq!(cache.held(), 6, "too heavy to keep");
        let none: ModelCache<&str, u8, usize> = ModelCache::with_capacity(0);
        let loaded = none.get_or_load("x", 0, || Ok::<_, ()>(1)).unwrap();
        assert_eq!(*loaded, 1);
        assert_eq!(none.held(), 0);
    }
}
