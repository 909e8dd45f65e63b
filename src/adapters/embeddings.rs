//! Textual-inversion embeddings: reading `.safetensors` embedding files in the layouts
//! people have (A1111 `emb_params` / `string_to_param.*`, diffusers `learned_embeds` or a
//! single `<token>` key, SDXL `clip_l` + `clip_g`), and the [`EmbeddingLibrary`] that
//! finds them by file stem inside the configured directories and caches them.
//!
//! A prompt uses an embedding by writing its file stem; the text encoder then replaces
//! the stem's tokens with the embedding's vectors (see `pipeline::text`).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::adapters::directory::{self, FileStamp, ModelCache};
use crate::error::ModelError;
use crate::models::single_file::header::{read_header, Header, MappedFile};

/// The most vectors an embedding may have: it must fit in one 75-token chunk.
pub const MAX_VECTORS: usize = 75;

/// An embedding file could not be found, read or used.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddingError {
    #[error("embedding directory {path}: {reason}")]
    BadDirectory { path: PathBuf, reason: String },
    #[error("embedding name {name:?} is not allowed: {reason}")]
    BadName { name: String, reason: String },
    #[error("unknown embedding {name:?}")]
    NotFound { name: String },
    #[error("embedding {name:?} ({file}): {reason}")]
    BadFile { name: String, file: String, reason: String },
    #[error("embedding {name:?} does not fit this model: {reason}")]
    Incompatible { name: String, reason: String },
}

/// Which text encoder vectors are wanted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderSlot {
    /// The only encoder of SD 1.x / 2.x.
    Single,
    /// SDXL's first encoder (CLIP ViT-L, `clip_l`).
    SdxlFirst,
    /// SDXL's second encoder (OpenCLIP ViT-bigG, `clip_g`; also the refiner's only one).
    SdxlSecond,
}

/// The vectors of one embedding.
#[derive(Debug, Clone)]
pub enum EmbeddingVectors {
    /// One set `[n, width]` for a single-encoder model.
    Single(Tensor),
    /// SDXL: one set per encoder, each `[n, width]`.
    Sdxl { clip_l: Option<Tensor>, clip_g: Option<Tensor> },
}

/// One loaded textual-inversion embedding (vectors on the CPU, f32).
#[derive(Debug, Clone)]
pub struct TextualInversion {
    /// The file stem, which is how prompts name it.
    pub name: String,
    pub vectors: EmbeddingVectors,
    /// The file's safetensors `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

/// How a file lays out its vectors, read from its header alone.
#[derive(Debug, Clone, PartialEq)]
enum Layout {
    Single { key: String, format: &'static str },
    Sdxl { clip_l: bool, clip_g: bool },
}

fn bad_file(name: &str, path: &Path, reason: impl Into<String>) -> EmbeddingError {
    let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    EmbeddingError::BadFile { name: name.to_string(), file, reason: reason.into() }
}

fn layout_of(name: &str, path: &Path, header: &Header) -> Result<Layout, EmbeddingError> {
    let (clip_l, clip_g) = (header.contains("clip_l"), header.contains("clip_g"));
    if clip_l || clip_g {
        return Ok(Layout::Sdxl { clip_l, clip_g });
    }
    if header.contains("emb_params") {
        return Ok(Layout::Single { key: "emb_params".into(), format: "a1111" });
    }
    let names = header.sorted_names();
    if let Some(key) = names.iter().find(|key| key.starts_with("string_to_param.")) {
        return Ok(Layout::Single { key: key.to_string(), format: "a1111" });
    }
    match names.as_slice() {
        [key] => Ok(Layout::Single { key: key.to_string(), format: "diffusers" }),
        [] => Err(bad_file(name, path, "the file holds no tensors")),
        _ => Err(bad_file(
            name,
            path,
            format!(
                "unrecognised layout (expected emb_params, string_to_param.*, clip_l/clip_g or \
                 a single tensor); keys: {}",
                names.join(", ")
            ),
        )),
    }
}

/// `[n, width]` of a vector set as stored (`[width]` counts as one vector).
fn vector_shape(
    name: &str,
    path: &Path,
    key: &str,
    shape: &[usize],
) -> Result<(usize, usize), EmbeddingError> {
    let (count, width) = match shape {
        [width] => (1, *width),
        [count, width] => (*count, *width),
        _ => {
            return Err(bad_file(name, path, format!("{key} has shape {shape:?}, not [n, width]")))
        }
    };
    if count == 0 || width == 0 {
        return Err(bad_file(name, path, format!("{key} is empty ({shape:?})")));
    }
    if count > MAX_VECTORS {
        return Err(bad_file(
            name,
            path,
            format!("{key} has {count} vectors; at most {MAX_VECTORS} fit in a prompt chunk"),
        ));
    }
    Ok((count, width))
}

fn model_error(name: &str, path: &Path, error: ModelError) -> EmbeddingError {
    bad_file(name, path, error.to_string())
}

impl TextualInversion {
    /// Loads the embedding at `path`, named `name` (its file stem).
    pub fn load(name: &str, path: &Path) -> Result<TextualInversion, EmbeddingError> {
        let file = MappedFile::open(path).map_err(|e| model_error(name, path, e))?;
        let header = file.header();
        let read = |key: &str| -> Result<Tensor, EmbeddingError> {
            let shape = header.shape(key).expect("the layout names present keys; this is a bug");
            let (count, width) = vector_shape(name, path, key, shape)?;
            let tensor = file.load(key).map_err(|e| model_error(name, path, e))?;
            let tensor = tensor
                .to_dtype(DType::F32)
                .and_then(|t| t.reshape((count, width)))
                .map_err(|e| bad_file(name, path, format!("{key}: {e}")))?;
            Ok(tensor)
        };
        let vectors = match layout_of(name, path, header)? {
            Layout::Single { key, .. } => EmbeddingVectors::Single(read(&key)?),
            Layout::Sdxl { clip_l, clip_g } => EmbeddingVectors::Sdxl {
                clip_l: clip_l.then(|| read("clip_l")).transpose()?,
                clip_g: clip_g.then(|| read("clip_g")).transpose()?,
            },
        };
        Ok(TextualInversion {
            name: name.to_string(),
            vectors,
            metadata: header.metadata.clone().into_iter().collect(),
        })
    }

    /// The vectors for one encoder, `[n, width]`; errors (naming the embedding) when the
    /// file has none for it or their width is not the encoder's.
    pub fn vectors_for(&self, slot: EncoderSlot, width: usize) -> Result<&Tensor, EmbeddingError> {
        let incompatible =
            |reason: String| EmbeddingError::Incompatible { name: self.name.clone(), reason };
        let vectors =
            match (&self.vectors, slot) {
                (EmbeddingVectors::Single(vectors), EncoderSlot::Single) => vectors,
                (EmbeddingVectors::Single(_), _) => return Err(incompatible(
                    "it is a single-encoder (SD 1.x/2.x) embedding; SDXL needs clip_l and clip_g"
                        .into(),
                )),
                (EmbeddingVectors::Sdxl { .. }, EncoderSlot::Single) => {
                    return Err(incompatible(
                        "it is an SDXL embedding (clip_l/clip_g); this model has one text encoder"
                            .into(),
                    ))
                }
                (EmbeddingVectors::Sdxl { clip_l, .. }, EncoderSlot::SdxlFirst) => clip_l
                    .as_ref()
                    .ok_or_else(|| incompatible("the file has no clip_l vectors".into()))?,
                (EmbeddingVectors::Sdxl { clip_g, .. }, EncoderSlot::SdxlSecond) => clip_g
                    .as_ref()
                    .ok_or_else(|| incompatible("the file has no clip_g vectors".into()))?,
            };
        let found = vectors.dim(1).expect("vectors are [n, width]; this is a bug");
        if found != width {
            return Err(incompatible(format!(
                "its vectors are {found} wide but the text encoder's embeddings are {width} wide"
            )));
        }
        Ok(vectors)
    }

    /// Number of vectors (tokens) the embedding stands for.
    pub fn vector_count(&self) -> usize {
        let first = match &self.vectors {
            EmbeddingVectors::Single(vectors) => Some(vectors),
            EmbeddingVectors::Sdxl { clip_l, clip_g } => clip_l.as_ref().or(clip_g.as_ref()),
        };
        first.map_or(0, |v| v.dim(0).expect("vectors are [n, width]; this is a bug"))
    }
}

/// What `GET /v1/embeddings` shows of one file (read from its header; no paths).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EmbeddingInfo {
    /// The file stem, which prompts use.
    pub name: String,
    /// `a1111`, `diffusers` or `sdxl`.
    pub format: String,
    /// Number of vectors (tokens) it stands for.
    pub vectors: usize,
    /// Width of its vectors (`clip_l`'s for SDXL files).
    pub width: usize,
    /// SDXL files: width of the `clip_g` vectors.
    pub width_g: Option<usize>,
    /// The safetensors `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

fn describe(name: &str, path: &Path) -> Result<EmbeddingInfo, EmbeddingError> {
    let header = read_header(path).map_err(|e| model_error(name, path, e))?;
    let shape_of = |key: &str| {
        let shape = header.shape(key).expect("the layout names present keys; this is a bug");
        vector_shape(name, path, key, shape)
    };
    let (format, vectors, width, width_g) = match layout_of(name, path, &header)? {
        Layout::Single { key, format } => {
            let (count, width) = shape_of(&key)?;
            (format, count, width, None)
        }
        Layout::Sdxl { clip_l, clip_g } => {
            let l = clip_l.then(|| shape_of("clip_l")).transpose()?;
            let g = clip_g.then(|| shape_of("clip_g")).transpose()?;
            let count = l.or(g).map_or(0, |(count, _)| count);
            ("sdxl", count, l.map_or(0, |(_, width)| width), g.map(|(_, width)| width))
        }
    };
    Ok(EmbeddingInfo {
        name: name.to_string(),
        format: format.to_string(),
        vectors,
        width,
        width_g,
        metadata: header.metadata.into_iter().collect(),
    })
}

/// A file found in an embeddings directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingFile {
    pub name: String,
    /// Canonical path, inside one of the library's directories.
    pub path: PathBuf,
}

/// The embeddings of the configured directories: found by file stem (top level of each
/// directory, `.safetensors` only; a name in an earlier directory wins), loaded on first
/// use and cached until the file changes. Shared by all workers.
pub struct EmbeddingLibrary {
    directories: Vec<PathBuf>,
    /// Loaded embeddings by path, valid while the file and the name it was loaded
    /// under are unchanged; unbounded (embeddings are small).
    cache: ModelCache<PathBuf, (FileStamp, String), TextualInversion>,
}

impl std::fmt::Debug for EmbeddingLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingLibrary").field("directories", &self.directories).finish()
    }
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

impl EmbeddingLibrary {
    /// A library over `directories`, each of which must exist.
    pub fn new(directories: &[PathBuf]) -> Result<EmbeddingLibrary, EmbeddingError> {
        let directories = directories
            .iter()
            .map(|dir| {
                let canonical = dir.canonicalize().map_err(|e| EmbeddingError::BadDirectory {
                    path: dir.clone(),
                    reason: e.to_string(),
                })?;
                if !canonical.is_dir() {
                    return Err(EmbeddingError::BadDirectory {
                        path: dir.clone(),
                        reason: "not a directory".into(),
                    });
                }
                Ok(canonical)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(EmbeddingLibrary { directories, cache: ModelCache::with_capacity(usize::MAX) })
    }

    /// Whether the library has no directories.
    pub fn is_empty(&self) -> bool {
        self.directories.is_empty()
    }

    /// Every embedding file, sorted by name. Files whose real location (after symlinks)
    /// is outside their directory are skipped.
    pub fn files(&self) -> Vec<EmbeddingFile> {
        let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
        for directory in &self.directories {
            let Ok(entries) = std::fs::read_dir(directory) else {
                tracing::warn!(directory = %directory.display(), "cannot read embeddings directory");
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if !is_safetensors(&path) {
                    continue;
                }
                let Some(name) = path.file_stem().and_then(|s| s.to_str()) else { continue };
                if found.contains_key(name) {
                    continue;
                }
                if let Some(real) = Self::inside(directory, &path) {
                    found.insert(name.to_string(), real);
                }
            }
        }
        found.into_iter().map(|(name, path)| EmbeddingFile { name, path }).collect()
    }

    /// The canonical path of `path` if it is a file inside `directory` (no symlink escape).
    fn inside(directory: &Path, path: &Path) -> Option<PathBuf> {
        let real = path.canonicalize().ok()?;
        (real.starts_with(directory) && real.is_file()).then_some(real)
    }

    /// Resolves a name to its file: only a bare file stem (no separators, `..`, absolute
    /// paths or extensions other than `.safetensors`), and only to a file that really lies
    /// inside a configured directory.
    pub fn resolve(&self, name: &str) -> Result<EmbeddingFile, EmbeddingError> {
        let refuse = |reason: &str| EmbeddingError::BadName {
            name: name.to_string(),
            reason: reason.to_string(),
        };
        let stem = name.strip_suffix(".safetensors").unwrap_or(name);
        if stem.is_empty() {
            return Err(refuse("empty"));
        }
        if stem.contains(['/', '\\', '\0']) || Path::new(stem).is_absolute() {
            return Err(refuse("a name is a file stem, not a path"));
        }
        if Path::new(stem).components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(refuse("a name is a file stem, not a path"));
        }
        for directory in &self.directories {
            let candidate = directory.join(format!("{stem}.safetensors"));
            if let Some(path) = Self::inside(directory, &candidate) {
                return Ok(EmbeddingFile { name: stem.to_string(), path });
            }
        }
        Err(EmbeddingError::NotFound { name: name.to_string() })
    }

    /// Loads (or takes from the cache) the embedding in `file`.
    pub fn load(&self, file: &EmbeddingFile) -> Result<Arc<TextualInversion>, EmbeddingError> {
        let stamp = directory::file_stamp(&file.path)
            .map_err(|e| bad_file(&file.name, &file.path, e.to_string()))?;
        self.cache.get_or_load(file.path.clone(), (stamp, file.name.clone()), || {
            TextualInversion::load(&file.name, &file.path)
        })
    }

    /// Loads an embedding by name (see [`EmbeddingLibrary::resolve`]).
    pub fn get(&self, name: &str) -> Result<Arc<TextualInversion>, EmbeddingError> {
        self.load(&self.resolve(name)?)
    }

    /// Describes every embedding from its header; unreadable files are logged and left out.
    pub fn list(&self) -> Vec<EmbeddingInfo> {
        self.files()
            .into_iter()
            .filter_map(|file| match describe(&file.name, &file.path) {
                Ok(info) => Some(info),
                Err(error) => {
                    tracing::warn!(%error, "skipping unreadable embedding");
                    None
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sdserve-embeddings-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(path: &Path, tensors: &[(&str, Vec<usize>)]) {
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(key, shape)| {
                let count: usize = shape.iter().product();
                let values: Vec<f32> = (0..count).map(|i| i as f32 * 0.01).collect();
                (key.to_string(), Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap())
            })
            .collect();
        candle_core::safetensors::save(&map, path).unwrap();
    }

    #[test]
    fn reads_every_layout() {
        let dir = temp_dir("layouts");
        write(&dir.join("a1111.safetensors"), &[("emb_params", vec![2, 8])]);
        write(&dir.join("a1111b.safetensors"), &[("string_to_param.*", vec![3, 8])]);
        write(&dir.join("diffusers.safetensors"), &[("<cat-toy>", vec![8])]);
        write(&dir.join("sdxl.safetensors"), &[("clip_l", vec![2, 8]), ("clip_g", vec![2, 12])]);
        write(&dir.join("weird.safetensors"), &[("a", vec![2, 8]), ("b", vec![2, 8])]);
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        std::fs::write(dir.join("old.pt"), "ignored").unwrap();
        let library = EmbeddingLibrary::new(std::slice::from_ref(&dir)).unwrap();
        let names: Vec<String> = library.files().into_iter().map(|f| f.name).collect();
        assert_eq!(names, ["a1111", "a1111b", "diffusers", "sdxl", "weird"]);

        let a = library.get("a1111").unwrap();
        assert_eq!(a.vector_count(), 2);
        assert_eq!(a.vectors_for(EncoderSlot::Single, 8).unwrap().dims(), &[2, 8]);
        assert_eq!(library.get("a1111b").unwrap().vector_count(), 3);
        let d = library.get("diffusers").unwrap();
        assert_eq!(d.vectors_for(EncoderSlot::Single, 8).unwrap().dims(), &[1, 8]);
        let x = library.get("sdxl").unwrap();
        assert_eq!(x.vectors_for(EncoderSlot::SdxlFirst, 8).unwrap().dims(), &[2, 8]);
        assert_eq!(x.vectors_for(EncoderSlot::SdxlSecond, 12).unwrap().dims(), &[2, 12]);
        let error = library.get("weird").unwrap_err().to_string();
        assert!(error.contains("weird") && error.contains("unrecognised layout"), "{error}");

        let listed = library.list();
        assert_eq!(listed.len(), 4);
        let sdxl = listed.iter().find(|info| info.name == "sdxl").unwrap();
        assert_eq!(
            (sdxl.format.as_str(), sdxl.vectors, sdxl.width, sdxl.width_g),
            ("sdxl", 2, 8, Some(12))
        );
    }

    #[test]
    fn wrong_width_or_family_names_the_embedding() {
        let dir = temp_dir("width");
        write(&dir.join("narrow.safetensors"), &[("emb_params", vec![2, 8])]);
        write(&dir.join("xl.safetensors"), &[("clip_l", vec![1, 8]), ("clip_g", vec![1, 8])]);
        let library = EmbeddingLibrary::new(&[dir]).unwrap();
        let narrow = library.get("narrow").unwrap();
        let error = narrow.vectors_for(EncoderSlot::Single, 768).unwrap_err().to_string();
        assert!(error.contains("\"narrow\"") && error.contains("768"), "{error}");
        let error = narrow.vectors_for(EncoderSlot::SdxlFirst, 8).unwrap_err().to_string();
        assert!(error.contains("single-encoder"), "{error}");
        let error = library.get("xl").unwrap().vectors_for(EncoderSlot::Single, 8).unwrap_err();
        assert!(error.to_string().contains("SDXL"), "{error}");
    }

    #[test]
    fn bad_files_are_errors_not_panics() {
        let dir = temp_dir("bad");
        std::fs::write(dir.join("garbage.safetensors"), b"not a safetensors file at all").unwrap();
        std::fs::write(dir.join("empty.safetensors"), b"").unwrap();
        write(&dir.join("cube.safetensors"), &[("emb_params", vec![2, 2, 2])]);
        write(&dir.join("huge.safetensors"), &[("emb_params", vec![76, 4])]);
        write(&dir.join("none.safetensors"), &[("emb_params", vec![0, 4])]);
        let library = EmbeddingLibrary::new(&[dir]).unwrap();
        for name in ["garbage", "empty", "cube", "huge", "none"] {
            let error = library.get(name).unwrap_err().to_string();
            assert!(error.contains(name), "{error}");
        }
        assert!(library.list().is_empty());
    }

    #[test]
    fn traversal_is_refused() {
        let root = temp_dir("traversal");
        let inner = root.join("embeddings");
        std::fs::create_dir_all(&inner).unwrap();
        write(&root.join("secret.safetensors"), &[("emb_params", vec![1, 4])]);
        write(&inner.join("ok.safetensors"), &[("emb_params", vec![1, 4])]);
        #[cfg(unix)]
        std::os::unix::fs::symlink(
            root.join("secret.safetensors"),
            inner.join("escape.safetensors"),
        )
        .unwrap();
        let library = EmbeddingLibrary::new(std::slice::from_ref(&inner)).unwrap();
        assert!(library.get("ok").is_ok());
        assert!(library.get("ok.safetensors").is_ok());
        for name in [
            "../secret",
            "..",
            "/etc/passwd",
            "sub/ok",
            "..\\secret",
            "",
            ".",
            "escape",
            "ok\0",
            "missing",
        ] {
            assert!(library.get(name).is_err(), "{name:?} must be refused");
        }
        let names: Vec<String> = library.files().into_iter().map(|f| f.name).collect();
        assert_eq!(names, ["ok"], "the escaping symlink is not listed");
        assert!(EmbeddingLibrary::new(&[root.join("nope")]).is_err());
    }

    #[test]
    fn cache_reloads_changed_files() {
        let dir = temp_dir("cache");
        let path = dir.join("e.safetensors");
        write(&path, &[("emb_params", vec![1, 4])]);
        let library = EmbeddingLibrary::new(&[dir]).unwrap();
        let first = library.get("e").unwrap();
        assert!(Arc::ptr_eq(&first, &library.get("e").unwrap()));
        write(&path, &[("emb_params", vec![3, 4])]);
        assert_eq!(library.get("e").unwrap().vector_count(), 3);
    }
}
