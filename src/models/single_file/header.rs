//! Reading a safetensors file defensively: the header is parsed and every length and
//! offset checked here, so a truncated or corrupt file becomes an error, never a panic.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::ModelError;

/// Headers larger than this are refused: real SDXL checkpoints have ~2 MB headers, and
/// reading a bogus multi-gigabyte "header" would only exhaust memory.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// One tensor as the header describes it; offsets are relative to the data section.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// The parsed and validated header of a safetensors file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Header {
    pub tensors: HashMap<String, TensorEntry>,
    /// The free-form `__metadata__` strings (e.g. `modelspec.prediction_type`).
    pub metadata: HashMap<String, String>,
    /// Byte offset of the data section in the file.
    pub data_start: usize,
}

impl Header {
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|entry| entry.shape.as_slice())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.tensors.keys().any(|name| name.starts_with(prefix))
    }

    /// Tensor names in sorted order, so errors and conversions are deterministic.
    pub fn sorted_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::InvalidSafetensors { path: path.to_path_buf(), reason: reason.into() }
}

fn io_error(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io { path: path.to_path_buf(), source }
}

/// Bytes per element of a safetensors dtype name, or None for dtypes candle cannot hold.
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

fn candle_dtype(dtype: &str) -> Option<DType> {
    Some(match dtype {
        "U8" => DType::U8,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F32" => DType::F32,
        "F64" => DType::F64,
        "I16" => DType::I16,
        "I32" => DType::I32,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "F8_E4M3" => DType::F8E4M3,
        _ => return None,
    })
}

/// Pickle archives (torch's zip format, or a raw pickle stream) renamed to .safetensors
/// would otherwise fail with a confusing header error.
fn looks_like_pickle(prefix: &[u8]) -> bool {
    let opens_json = prefix.get(8) == Some(&b'{');
    let zip = prefix.starts_with(b"PK\x03\x04");
    let raw_pickle = prefix.first() == Some(&0x80) && matches!(prefix.get(1), Some(2..=5));
    !opens_json && (zip || raw_pickle)
}

/// Refuses paths that are missing or are pickles by extension.
pub(crate) fn check_path(path: &Path) -> Result<(), ModelError> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    let extension = path
        .extension()
        .and_then(|ext| ext.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if matches!(extension.as_str(), "ckpt" | "pt" | "pth" | "bin" | "pkl" | "pickle") {
        return Err(ModelError::PickleRefused(path.to_path_buf()));
    }
    if path.is_dir() {
        return Err(invalid(path, "this is a directory, not a single-file checkpoint"));
    }
    Ok(())
}

/// Reads and validates the header without touching the tensor data.
pub(crate) fn read_header(path: &Path) -> Result<Header, ModelError> {
    check_path(path)?;
    let mut file = File::open(path).map_err(|source| io_error(path, source))?;
    let file_len = file.metadata().map_err(|source| io_error(path, source))?.len();
    let mut prefix = [0u8; 9];
    let prefix_len = read_up_to(&mut file, &mut prefix).map_err(|source| io_error(path, source))?;
    if looks_like_pickle(&prefix[..prefix_len]) {
        return Err(ModelError::PickleRefused(path.to_path_buf()));
    }
    if file_len < 8 {
        return Err(invalid(
            path,
            format!("the file is {file_len} bytes, too short for the 8-byte header length"),
        ));
    }
    let header_len = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes; this is a bug"));
    if header_len > file_len - 8 {
        return Err(invalid(
            path,
            format!(
                "the header length says {header_len} bytes but only {} bytes follow \
                 (truncated or not a safetensors file)",
                file_len - 8
            ),
        ));
    }
    if header_len == 0 {
        return Err(invalid(path, "the header is empty"));
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(invalid(path, format!("header of {header_len} bytes is implausibly large")));
    }
    let mut header_bytes = vec![0u8; header_len as usize];
    header_bytes[0] = prefix[8];
    if header_len > 1 {
        file.read_exact(&mut header_bytes[1..]).map_err(|source| io_error(path, source))?;
    }
    let data_len = file_len - 8 - header_len;
    parse_header(path, &header_bytes, data_len, 8 + header_len as usize)
}

fn read_up_to(file: &mut File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..])? {
            0 => break,
            read => filled += read,
        }
    }
    Ok(filled)
}

fn parse_header(
    path: &Path,
    bytes: &[u8],
    data_len: u64,
    data_start: usize,
) -> Result<Header, ModelError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|err| invalid(path, format!("the header is not UTF-8: {err}")))?;
    let json: serde_json::Value = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|err| invalid(path, format!("the header is not valid JSON: {err}")))?;
    let object =
        json.as_object().ok_or_else(|| invalid(path, "the header is not a JSON object"))?;
    let mut header = Header { data_start, ..Header::default() };
    for (name, value) in object {
        if name == "__metadata__" {
            if let Some(entries) = value.as_object() {
                for (key, text) in entries {
                    if let Some(text) = text.as_str() {
                        header.metadata.insert(key.clone(), text.to_string());
                    }
                }
            }
            continue;
        }
        let entry = parse_entry(value, data_len)
            .map_err(|reason| invalid(path, format!("tensor {name}: {reason}")))?;
        header.tensors.insert(name.clone(), entry);
    }
    Ok(header)
}

fn parse_entry(value: &serde_json::Value, data_len: u64) -> Result<TensorEntry, String> {
    let dtype =
        value.get("dtype").and_then(|dtype| dtype.as_str()).ok_or("missing \"dtype\"")?.to_string();
    let shape = value
        .get("shape")
        .and_then(|shape| shape.as_array())
        .ok_or("missing \"shape\"")?
        .iter()
        .map(|dim| dim.as_u64().and_then(|dim| usize::try_from(dim).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or("\"shape\" must be a list of non-negative integers")?;
    let offsets = value
        .get("data_offsets")
        .and_then(|offsets| offsets.as_array())
        .filter(|offsets| offsets.len() == 2)
        .ok_or("missing \"data_offsets\" [begin, end]")?;
    let begin = offsets[0].as_u64().ok_or("data_offsets must be integers")?;
    let end = offsets[1].as_u64().ok_or("data_offsets must be integers")?;
    if begin > end {
        return Err(format!("data_offsets [{begin}, {end}] run backwards"));
    }
    if end > data_len {
        return Err(format!(
            "its data ends at byte {end} but the data section has only {data_len} bytes \
             (the file is truncated)"
        ));
    }
    if let Some(element_size) = dtype_size(&dtype) {
        let expected = shape
            .iter()
            .try_fold(element_size as u64, |acc, &dim| acc.checked_mul(dim as u64))
            .ok_or("shape overflows")?;
        if expected != end - begin {
            return Err(format!(
                "shape {shape:?} of {dtype} needs {expected} bytes but data_offsets span {}",
                end - begin
            ));
        }
    }
    Ok(TensorEntry { dtype, shape, start: begin as usize, end: end as usize })
}

/// A memory-mapped safetensors file whose header has been validated.
pub(crate) struct MappedFile {
    path: PathBuf,
    header: Header,
    map: memmap2::Mmap,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let header = read_header(path)?;
        let file = File::open(path).map_err(|source| io_error(path, source))?;
        // SAFETY: the map is read-only; as with every mmap-based loader, a file truncated
        // by another process while we read it could fault. Lengths were checked above.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| io_error(path, source))?;
        let needed = header.tensors.values().map(|entry| entry.end).max().unwrap_or(0);
        if header.data_start + needed > map.len() {
            return Err(invalid(path, "the file changed size while being opened"));
        }
        Ok(MappedFile { path: path.to_path_buf(), header, map })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Loads one tensor onto the CPU in the dtype it is stored in.
    pub fn load(&self, name: &str) -> Result<Tensor, ModelError> {
        let entry = self.header.tensors.get(name).ok_or_else(|| ModelError::UnknownLayout {
            path: self.path.clone(),
            reason: format!("missing tensor {name}"),
        })?;
        let dtype = candle_dtype(&entry.dtype).ok_or_else(|| {
            invalid(&self.path, format!("tensor {name} has unsupported dtype {}", entry.dtype))
        })?;
        let start = self.header.data_start + entry.start;
        let end = self.header.data_start + entry.end;
        let bytes = &self.map[start..end];
        Ok(Tensor::from_raw_buffer(bytes, dtype, &entry.shape, &Device::Cpu)?)
    }

    /// Reads a scalar integer tensor (e.g. `global_step`), if it has one element.
    pub fn read_scalar_i64(&self, name: &str) -> Option<i64> {
        let tensor = self.load(name).ok()?;
        if tensor.elem_count() != 1 {
            return None;
        }
        let value = tensor.flatten_all().ok()?.to_dtype(DType::F64).ok()?;
        value.to_vec1::<f64>().ok()?.first().map(|value| *value as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    fn with_header(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sdserve-header-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn parses_a_valid_header_and_loads_the_tensor() {
        let dir = temp_dir("valid");
        let header =
            r#"{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut data = Vec::new();
        data.extend_from_slice(&1.5f32.to_le_bytes());
        data.extend_from_slice(&(-2f32).to_le_bytes());
        let path = write(&dir, "ok.safetensors", &with_header(header, &data));
        let file = MappedFile::open(&path).unwrap();
        assert_eq!(file.header().metadata["k"], "v");
        assert_eq!(file.load("a").unwrap().to_vec1::<f32>().unwrap(), vec![1.5, -2.0]);
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        let dir = temp_dir("corrupt");
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("short", vec![1, 2, 3], "too short"),
            ("biglen", with_header("{}", &[]).iter().map(|_| 0xff).collect(), "header length"),
            ("json", with_header("{not json", &[]), "not valid JSON"),
            (
                "truncated",
                with_header(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &[0; 8]),
                "truncated",
            ),
            (
                "mismatch",
                with_header(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0; 8]),
                "needs 12 bytes",
            ),
            ("array", with_header("[1,2]", &[]), "not a JSON object"),
            ("empty", 0u64.to_le_bytes().to_vec(), "header is empty"),
        ];
        for (name, bytes, expected) in cases {
            let path = write(&dir, &format!("{name}.safetensors"), &bytes);
            match read_header(&path) {
                Err(ModelError::InvalidSafetensors { reason, .. }) => {
                    assert!(reason.contains(expected), "{name}: {reason}")
                }
                other => panic!("{name}: expected InvalidSafetensors, got {other:?}"),
            }
        }
    }

    #[test]
    fn pickles_and_missing_files_are_refused() {
        let dir = temp_dir("pickle");
        let ckpt = write(&dir, "model.ckpt", b"PK\x03\x04whatever");
        assert!(matches!(read_header(&ckpt), Err(ModelError::PickleRefused(_))));
        let disguised = write(&dir, "model.safetensors", b"PK\x03\x04whatever-zip-data");
        assert!(matches!(read_header(&disguised), Err(ModelError::PickleRefused(_))));
        let missing = dir.join("absent.safetensors");
        assert!(matches!(read_header(&missing), Err(ModelError::NotFound(_))));
    }
}
