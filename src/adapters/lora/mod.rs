//! LoRA-family adapter files: reading them (`.safetensors` only), naming the layers they
//! change in the model's own diffusers names ([`targets`]), computing each layer's weight
//! delta ([`delta`]), finding files by name in the configured directories with a
//! memory-bounded cache ([`library`]), and the A1111 prompt tag `<lora:name:weight>`.
//!
//! Application strategy: a request's LoRAs are merged into *copies* of the weights they
//! touch, and the UNet / text encoders are rebuilt from the base name → tensor maps with
//! those copies swapped in (candle's layers are immutable and share storage with the
//! maps, so the untouched tensors cost nothing). The base networks are never modified,
//! so "restoring" them is exact by construction and concurrent requests cannot see each
//! other's weights. See [`targets::patch_weights`] for the cost.

pub mod delta;
pub mod library;
pub mod targets;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use library::{LoraInfo, LoraLibrary};

/// Largest weight a request may give one LoRA (either sign).
pub const MAX_LORA_WEIGHT: f64 = 10.0;
/// Most LoRAs one request may use.
pub const MAX_LORAS_PER_REQUEST: usize = 16;

/// Reading or applying a LoRA went wrong; messages are written for users.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("unknown LoRA {0:?}: no such .safetensors file in the configured LoRA directories")]
    UnknownName(String),
    #[error("LoRA name {name:?} is not allowed: {reason}")]
    BadName { name: String, reason: String },
    #[error(
        "LoRA {0} is a pickle file; loading pickles can run arbitrary code, so only \
         .safetensors LoRAs are accepted"
    )]
    PickleRefused(PathBuf),
    #[error("LoRA {path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("LoRA {path}: none of its {count} layers matches this model (first: {first})")]
    NothingMatches { path: PathBuf, count: usize, first: String },
    #[error("LoRA {path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("LoRA {path}: layer {layer}: {reason}")]
    BadLayer { path: PathBuf, layer: String, reason: String },
}

/// The factors of one adapted layer, as stored in the file (f32, on the CPU).
#[derive(Debug, Clone)]
pub enum LayerFactors {
    /// LoRA / LoCon: `delta = up @ down` (conv: down `[r, in, kh, kw]`, up `[out, r, 1, 1]`).
    LowRank { down: Tensor, up: Tensor },
    /// LoHa: `delta = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`, or with Tucker cores `t1`, `t2` for
    /// convolutions.
    Hadamard {
        w1_a: Tensor,
        w1_b: Tensor,
        w2_a: Tensor,
        w2_b: Tensor,
        t1: Option<Tensor>,
        t2: Option<Tensor>,
    },
    /// LoKr: `delta = kron(w1, w2)`, each either full or a low-rank pair.
    Kronecker { w1: KronFactor, w2: KronFactor },
}

/// One side of a LoKr product.
#[derive(Debug, Clone)]
pub enum KronFactor {
    Full(Tensor),
    LowRank { a: Tensor, b: Tensor },
}

/// One adapted layer: its module key as written in the file (without the parameter
/// suffix), its factors and its optional `alpha`.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    pub key: String,
    pub factors: LayerFactors,
    pub alpha: Option<f64>,
}

impl LoraLayer {
    /// The rank the `alpha / rank` scale divides by; `None` when the layer has no rank
    /// (a LoKr with two full factors), which means scale 1.
    pub fn rank(&self) -> Option<usize> {
        match &self.factors {
            LayerFactors::LowRank { down, .. } => down.dims().first().copied(),
            LayerFactors::Hadamard { w1_b, .. } => w1_b.dims().first().copied(),
            LayerFactors::Kronecker { w1, w2 } => match (w1, w2) {
                (KronFactor::LowRank { b, .. }, _) | (_, KronFactor::LowRank { b, .. }) => {
                    b.dims().first().copied()
                }
                _ => None,
            },
        }
    }

    /// kohya's scale: `alpha / rank` when the file has an alpha, else 1.
    pub fn scale(&self) -> f64 {
        match (self.alpha, self.rank()) {
            (Some(alpha), Some(rank)) if rank > 0 => alpha / rank as f64,
            _ => 1.0,
        }
    }
}

/// A parsed LoRA file.
#[derive(Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    pub layers: Vec<LoraLayer>,
    /// Tensor names that are not part of any layer this reader understands.
    pub unknown_keys: Vec<String>,
    /// The safetensors `__metadata__` (training settings, as kohya writes them).
    pub metadata: BTreeMap<String, String>,
    /// Bytes the parsed tensors take in memory (for the cache bound).
    pub bytes: usize,
}

/// The suffixes that name a layer's parameters, per format, and which slot they fill.
const SUFFIXES: [(&str, Slot); 21] = [
    (".lora_down.weight", Slot::Down),
    (".lora_up.weight", Slot::Up),
    (".lora_A.weight", Slot::Down),
    (".lora_B.weight", Slot::Up),
    (".lora.down.weight", Slot::Down),
    (".lora.up.weight", Slot::Up),
    (".lora_linear_layer.down.weight", Slot::Down),
    (".lora_linear_layer.up.weight", Slot::Up),
    (".lora_mid.weight", Slot::Unsupported("LoCon with a Tucker core (lora_mid)")),
    (".alpha", Slot::Alpha),
    (".hada_w1_a", Slot::HadaW1A),
    (".hada_w1_b", Slot::HadaW1B),
    (".hada_w2_a", Slot::HadaW2A),
    (".hada_w2_b", Slot::HadaW2B),
    (".hada_t1", Slot::HadaT1),
    (".hada_t2", Slot::HadaT2),
    (".lokr_w1", Slot::LokrW1),
    (".lokr_w2", Slot::LokrW2),
    (".lokr_w1_a", Slot::LokrW1A),
    (".lokr_w1_b", Slot::LokrW1B),
    (".lokr_w2_a", Slot::LokrW2A),
];

/// Suffixes checked after [`SUFFIXES`] (kept apart to keep that table's length readable).
const MORE_SUFFIXES: [(&str, Slot); 4] = [
    (".lokr_w2_b", Slot::LokrW2B),
    (".lokr_t2", Slot::Unsupported("LoKr with a Tucker core (lokr_t2)")),
    (".dora_scale", Slot::Unsupported(DORA_REFUSAL)),
    (".lora_magnitude_vector.weight", Slot::Unsupported(DORA_REFUSAL)),
];

const DORA_REFUSAL: &str = "DoRA (dora_scale / lora_magnitude_vector) is not supported: \
     its weight-normalised merge differs between trainers and cannot be applied exactly";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Down,
    Up,
    Alpha,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW2,
    LokrW1A,
    LokrW1B,
    LokrW2A,
    LokrW2B,
    Unsupported(&'static str),
}

/// diffusers' old attention-processor layout (`attn1.processor.to_q_lora.down.weight`)
/// → the module path of the projection it adapts.
fn normalise_processor_key(name: &str) -> String {
    let mut name = name.to_string();
    for (old, new) in [
        (".processor.to_q_lora.", ".to_q.lora."),
        (".processor.to_k_lora.", ".to_k.lora."),
        (".processor.to_v_lora.", ".to_v.lora."),
        (".processor.to_out_lora.", ".to_out.0.lora."),
    ] {
        name = name.replace(old, new);
    }
    name
}

fn split_suffix(name: &str) -> Option<(&str, Slot)> {
    SUFFIXES
        .iter()
        .chain(MORE_SUFFIXES.iter())
        .find_map(|(suffix, slot)| name.strip_suffix(suffix).map(|module| (module, *slot)))
}

/// Reads the `__metadata__` of a safetensors file without reading its tensors.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>, LoraError> {
    let bad = |reason: String| LoraError::BadFile { path: path.to_path_buf(), reason };
    let mut file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(|_| bad("too short for a safetensors header".into()))?;
    let length = u64::from_le_bytes(length);
    let file_length = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    if length > 100 * 1024 * 1024 || length + 8 > file_length {
        return Err(bad(format!("header length {length} does not fit the file")));
    }
    let mut header = vec![0u8; length as usize];
    file.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let mut metadata = BTreeMap::new();
    if let Some(object) = header.get("__metadata__").and_then(serde_json::Value::as_object) {
        for (key, value) in object {
            let text = value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
            metadata.insert(key.clone(), text);
        }
    }
    Ok(metadata)
}

/// True for the file types that are pickles in disguise.
pub fn is_pickle(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref(),
        Some("ckpt" | "bin" | "pt" | "pth" | "pkl")
    )
}

#[derive(Default)]
struct PendingLayer {
    slots: Vec<(Slot, Tensor)>,
}

impl PendingLayer {
    fn take(&mut self, slot: Slot) -> Option<Tensor> {
        let index = self.slots.iter().position(|(s, _)| *s == slot)?;
        Some(self.slots.remove(index).1)
    }
}

impl LoraFile {
    /// Reads and groups the tensors of a LoRA `.safetensors` file (all formats at once:
    /// a file may mix them, as LyCORIS files do).
    pub fn read(path: &Path) -> Result<LoraFile, LoraError> {
        if is_pickle(path) {
            return Err(LoraError::PickleRefused(path.to_path_buf()));
        }
        let bad = |reason: String| LoraError::BadFile { path: path.to_path_buf(), reason };
        let metadata = read_metadata(path)?;
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
        let mut pending: BTreeMap<String, PendingLayer> = BTreeMap::new();
        let mut unknown_keys = Vec::new();
        let mut bytes = 0;
        for (name, tensor) in tensors {
            let normalised = normalise_processor_key(&name);
            let Some((module, slot)) = split_suffix(&normalised) else {
                unknown_keys.push(name);
                continue;
            };
            if let Slot::Unsupported(reason) = slot {
                return Err(LoraError::Unsupported {
                    path: path.to_path_buf(),
                    reason: format!("{name}: {reason}"),
                });
            }
            let tensor = tensor.to_dtype(DType::F32).map_err(|e| bad(e.to_string()))?;
            bytes += tensor.elem_count() * 4;
            pending.entry(module.to_string()).or_default().slots.push((slot, tensor));
        }
        let mut layers = Vec::new();
        for (key, mut layer) in pending {
            let alpha = match layer.take(Slot::Alpha) {
                Some(alpha) => Some(scalar(&alpha).map_err(|reason| LoraError::BadLayer {
                    path: path.to_path_buf(),
                    layer: key.clone(),
                    reason,
                })?),
                None => None,
            };
            let factors = group_factors(&mut layer).map_err(|reason| LoraError::BadLayer {
                path: path.to_path_buf(),
                layer: key.clone(),
                reason,
            })?;
            match factors {
                Some(factors) => layers.push(LoraLayer { key, factors, alpha }),
                // An alpha without factors (some trainers write them for every module).
                None if layer.slots.is_empty() => {}
                None => unknown_keys.push(key),
            }
        }
        if layers.is_empty() {
            return Err(bad(format!(
                "no LoRA layers found (expected kohya lora_down/lora_up, diffusers/peft \
                 lora_A/lora_B, LoHa hada_* or LoKr lokr_* tensors){}",
                unknown_keys.first().map(|k| format!("; first tensor: {k}")).unwrap_or_default()
            )));
        }
        Ok(LoraFile { path: path.to_path_buf(), layers, unknown_keys, metadata, bytes })
    }
}

fn scalar(tensor: &Tensor) -> Result<f64, String> {
    let values =
        tensor.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| e.to_string())?;
    match values.as_slice() {
        [value] if value.is_finite() => Ok(f64::from(*value)),
        _ => Err(format!("alpha must be one finite number, got shape {:?}", tensor.dims())),
    }
}

fn group_factors(layer: &mut PendingLayer) -> Result<Option<LayerFactors>, String> {
    if let (Some(down), Some(up)) = (layer.take(Slot::Down), layer.take(Slot::Up)) {
        return Ok(Some(LayerFactors::LowRank { down, up }));
    }
    let hada = [Slot::HadaW1A, Slot::HadaW1B, Slot::HadaW2A, Slot::HadaW2B];
    if hada.iter().any(|slot| layer.slots.iter().any(|(s, _)| s == slot)) {
        let mut take = |slot: Slot, name: &str| {
            layer.take(slot).ok_or_else(|| format!("LoHa layer without {name}"))
        };
        let (w1_a, w1_b) = (take(Slot::HadaW1A, "hada_w1_a")?, take(Slot::HadaW1B, "hada_w1_b")?);
        let (w2_a, w2_b) = (take(Slot::HadaW2A, "hada_w2_a")?, take(Slot::HadaW2B, "hada_w2_b")?);
        let (t1, t2) = (layer.take(Slot::HadaT1), layer.take(Slot::HadaT2));
        if t1.is_some() != t2.is_some() {
            return Err("LoHa layer with only one of hada_t1 / hada_t2".into());
        }
        return Ok(Some(LayerFactors::Hadamard { w1_a, w1_b, w2_a, w2_b, t1, t2 }));
    }
    let lokr = [Slot::LokrW1, Slot::LokrW2, Slot::LokrW1A, Slot::LokrW2A];
    if lokr.iter().any(|slot| layer.slots.iter().any(|(s, _)| s == slot)) {
        let mut factor = |full: Slot, a: Slot, b: Slot, name: &str| {
            if let Some(w) = layer.take(full) {
                return Ok(KronFactor::Full(w));
            }
            match (layer.take(a), layer.take(b)) {
                (Some(a), Some(b)) => Ok(KronFactor::LowRank { a, b }),
                _ => Err(format!("LoKr layer without {name} (or both {name}_a and {name}_b)")),
            }
        };
        let w1 = factor(Slot::LokrW1, Slot::LokrW1A, Slot::LokrW1B, "lokr_w1")?;
        let w2 = factor(Slot::LokrW2, Slot::LokrW2A, Slot::LokrW2B, "lokr_w2")?;
        return Ok(Some(LayerFactors::Kronecker { w1, w2 }));
    }
    if layer.slots.iter().any(|(s, _)| matches!(s, Slot::Down | Slot::Up)) {
        return Err("a LoRA layer needs both its down and up weights".into());
    }
    Ok(None)
}

/// Removes A1111's `<lora:name:weight>` tags (weight optional, default 1) from a prompt
/// and returns the cleaned prompt and the tags in order. Malformed tags stay as text.
pub fn extract_lora_tags(prompt: &str) -> (String, Vec<(String, f64)>) {
    let mut cleaned = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        cleaned.push_str(&rest[..start]);
        let after = &rest[start + "<lora:".len()..];
        let parsed = after.find('>').and_then(|end| {
            let body = &after[..end];
            let mut parts = body.split(':');
            let name = parts.next()?.trim();
            let weight = match parts.next() {
                Some(text) => text.trim().parse::<f64>().ok()?,
                None => 1.0,
            };
            // A1111 allows further `:te=...` style arguments; they are ignored here.
            (!name.is_empty()).then(|| (name.to_string(), weight, end))
        });
        match parsed {
            Some((name, weight, end)) => {
                tags.push((name, weight));
                rest = &after[end + 1..];
            }
            None => {
                cleaned.push_str("<lora:");
                rest = after;
            }
        }
    }
    cleaned.push_str(rest);
    (cleaned, tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_are_removed_and_returned() {
        let (text, tags) = extract_lora_tags("a cat <lora:style:0.7>, sitting<lora:other>");
        assert_eq!(text, "a cat , sitting");
        assert_eq!(tags, vec![("style".to_string(), 0.7), ("other".to_string(), 1.0)]);
    }

    #[test]
    fn malformed_lora_tags_stay_text() {
        for prompt in ["<lora:>", "<lora:x:abc>", "<lora:open", "a <lora:", "<lora::1>"] {
            let (text, tags) = extract_lora_tags(prompt);
            assert_eq!(text, prompt);
            assert!(tags.is_empty(), "{prompt}");
        }
    }

    #[test]
    fn processor_keys_become_module_paths() {
        let key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight";
        let normalised = normalise_processor_key(key);
        let (module, slot) = split_suffix(&normalised).unwrap();
        assert_eq!(module, "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0");
        assert_eq!(slot, Slot::Up);
    }
}
