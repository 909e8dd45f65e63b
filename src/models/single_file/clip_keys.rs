//! Text encoder keys → Hugging Face `CLIPTextModel(WithProjection)` names, from the two
//! layouts checkpoints use: the HF layout (SD 1.x, SDXL's first encoder) with a prefix to
//! strip, and the OpenCLIP layout (SD 2.x, SDXL's second encoder) with fused q/k/v.

use serde_json::Value;

use super::fields::Fields;
use super::header::Header;
use super::plan::{insert, Plan, Reshape};

/// The text encoder dimensions the checks need.
struct ClipShape {
    layers: usize,
    hidden: usize,
    vocab: usize,
    positions: usize,
}

fn clip_shape(component: &str, config: &Value) -> Result<ClipShape, String> {
    let fields = Fields::new(component, config);
    Ok(ClipShape {
        layers: fields.usize("num_hidden_layers", 12)?,
        hidden: fields.usize("hidden_size", 512)?,
        vocab: fields.usize("vocab_size", 49408)?,
        positions: fields.usize("max_position_embeddings", 77)?,
    })
}

/// The encoder layer index of a `...layers.N.rest` style key.
fn layer_index(key: &str, marker: &str) -> Option<usize> {
    key.strip_prefix(marker)?.split('.').next()?.parse().ok()
}

/// HF-layout text encoder under `prefix` (e.g. `cond_stage_model.transformer.`). Layers
/// beyond the config's `num_hidden_layers` are dropped, like diffusers does.
pub(crate) fn hf_clip_plan(
    header: &Header,
    prefix: &str,
    component: &str,
    config: &Value,
) -> Result<Plan, String> {
    let shape = clip_shape(component, config)?;
    let mut plan = Plan::new();
    for name in header.sorted_names() {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        // Older SD 1.x exports omit the `text_model.` level.
        let diffusers = if rest.starts_with("text_model.") {
            rest.to_string()
        } else {
            format!("text_model.{rest}")
        };
        if diffusers.ends_with("position_ids") {
            continue;
        }
        if let Some(layer) = layer_index(&diffusers, "text_model.encoder.layers.") {
            if layer >= shape.layers {
                continue;
            }
        }
        insert(&mut plan, diffusers, name, Reshape::AsIs)?;
    }
    let required = |diffusers: &str| {
        plan.contains_key(diffusers).then_some(()).ok_or_else(|| {
            format!("missing tensor {prefix}{diffusers} (the {component} is incomplete)")
        })
    };
    required("text_model.embeddings.token_embedding.weight")?;
    required("text_model.embeddings.position_embedding.weight")?;
    required("text_model.final_layer_norm.weight")?;
    for layer in 0..shape.layers {
        for module in ["layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
            .iter()
            .chain(&["self_attn.out_proj", "layer_norm2", "mlp.fc1", "mlp.fc2"])
        {
            required(&format!("text_model.encoder.layers.{layer}.{module}.weight"))?;
        }
    }
    check_embeddings(header, &plan, &shape, component)?;
    Ok(plan)
}

/// OpenCLIP-layout text encoder under `prefix` (e.g. `cond_stage_model.model.`).
/// `with_projection` keeps `text_projection` (SDXL's CLIPTextModelWithProjection).
pub(crate) fn open_clip_plan(
    header: &Header,
    prefix: &str,
    component: &str,
    config: &Value,
    with_projection: bool,
) -> Result<Plan, String> {
    let shape = clip_shape(component, config)?;
    let mut plan = Plan::new();
    for name in header.sorted_names() {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let (diffusers, reshape) = match rest {
            "token_embedding.weight" => {
                ("text_model.embeddings.token_embedding.weight".to_string(), Reshape::AsIs)
            }
            "positional_embedding" => {
                ("text_model.embeddings.position_embedding.weight".to_string(), Reshape::AsIs)
            }
            "ln_final.weight" | "ln_final.bias" => {
                let param = &rest["ln_final.".len()..];
                (format!("text_model.final_layer_norm.{param}"), Reshape::AsIs)
            }
            "text_projection" if with_projection => {
                ("text_projection.weight".to_string(), Reshape::Transpose)
            }
            _ if rest.starts_with("transformer.resblocks.") => {
                let layer = layer_index(rest, "transformer.resblocks.")
                    .ok_or_else(|| format!("{name}: malformed layer index"))?;
                if layer >= shape.layers {
                    continue;
                }
                let inner = &rest[format!("transformer.resblocks.{layer}.").len()..];
                let base = format!("text_model.encoder.layers.{layer}.");
                if let Some(param) = fused_qkv_param(inner) {
                    for (index, projection) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                        let target = format!("{base}self_attn.{projection}.{param}");
                        insert(&mut plan, target, name, Reshape::Chunk { index, parts: 3 })?;
                    }
                    continue;
                }
                let renamed = open_clip_layer_name(inner)
                    .ok_or_else(|| format!("{name} is not a known OpenCLIP layer parameter"))?;
                (format!("{base}{renamed}"), Reshape::AsIs)
            }
            // Training-only buffers and the unused parts of the CLIP model.
            _ => continue,
        };
        insert(&mut plan, diffusers, name, reshape)?;
    }
    let required = |source: &str, diffusers: &str| {
        plan.contains_key(diffusers).then_some(()).ok_or_else(|| {
            format!("missing tensor {prefix}{source} (the {component} is incomplete)")
        })
    };
    required("token_embedding.weight", "text_model.embeddings.token_embedding.weight")?;
    required("positional_embedding", "text_model.embeddings.position_embedding.weight")?;
    required("ln_final.weight", "text_model.final_layer_norm.weight")?;
    if with_projection {
        required("text_projection", "text_projection.weight")?;
    }
    for layer in 0..shape.layers {
        let base = format!("text_model.encoder.layers.{layer}.");
        for (source, diffusers) in [
            ("ln_1.weight", "layer_norm1.weight"),
            ("attn.in_proj_weight", "self_attn.q_proj.weight"),
            ("attn.out_proj.weight", "self_attn.out_proj.weight"),
            ("ln_2.weight", "layer_norm2.weight"),
            ("mlp.c_fc.weight", "mlp.fc1.weight"),
            ("mlp.c_proj.weight", "mlp.fc2.weight"),
        ] {
            required(
                &format!("transformer.resblocks.{layer}.{source}"),
                &format!("{base}{diffusers}"),
            )?;
        }
    }
    check_embeddings(header, &plan, &shape, component)?;
    if let Some(source) = plan.get("text_model.encoder.layers.0.self_attn.q_proj.weight") {
        let fused = header.shape(&source.key).unwrap_or(&[]);
        if fused.first() != Some(&(3 * shape.hidden)) {
            return Err(format!(
                "{} has shape {fused:?}, but the {component} config's hidden_size {} needs {} rows",
                source.key,
                shape.hidden,
                3 * shape.hidden
            ));
        }
    }
    Ok(plan)
}

fn fused_qkv_param(inner: &str) -> Option<&'static str> {
    match inner {
        "attn.in_proj_weight" => Some("weight"),
        "attn.in_proj_bias" => Some("bias"),
        _ => None,
    }
}

fn open_clip_layer_name(inner: &str) -> Option<String> {
    let (module, param) = inner.rsplit_once('.')?;
    if !matches!(param, "weight" | "bias") {
        return None;
    }
    let renamed = match module {
        "ln_1" => "layer_norm1",
        "ln_2" => "layer_norm2",
        "mlp.c_fc" => "mlp.fc1",
        "mlp.c_proj" => "mlp.fc2",
        "attn.out_proj" => "self_attn.out_proj",
        _ => return None,
    };
    Some(format!("{renamed}.{param}"))
}

/// The embedding shapes tell a real encoder from a tiny one with the same key names.
fn check_embeddings(
    header: &Header,
    plan: &Plan,
    shape: &ClipShape,
    component: &str,
) -> Result<(), String> {
    let checks = [
        (
            "text_model.embeddings.token_embedding.weight",
            [shape.vocab, shape.hidden],
            "vocab_size x hidden_size",
        ),
        (
            "text_model.embeddings.position_embedding.weight",
            [shape.positions, shape.hidden],
            "max_position_embeddings x hidden_size",
        ),
    ];
    for (diffusers, expected, what) in checks {
        let source = &plan[diffusers].key;
        let actual = header.shape(source).unwrap_or(&[]);
        if actual != expected {
            return Err(format!(
                "{source} has shape {actual:?}, but the {component} config's {what} is {expected:?}"
            ));
        }
    }
    Ok(())
}
