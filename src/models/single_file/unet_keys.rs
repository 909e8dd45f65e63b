//! The UNet's original (LDM) key layout → diffusers names. LDM numbers its blocks flat
//! (`input_blocks.N`, `output_blocks.N`), so the block each index belongs to is derived
//! from the diffusers config: blocks, layers per block and which blocks have attention.

use std::collections::HashMap;

use serde_json::Value;

use super::fields::Fields;
use super::header::Header;
use super::plan::{insert, Plan, Reshape};

/// Where the UNet lives inside an original checkpoint.
pub(crate) const UNET_PREFIX: &str = "model.diffusion_model.";

/// What kind of module an LDM block prefix holds; it decides how the rest of a key maps.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    /// A single layer (conv, linear or norm): only `weight`/`bias` follow.
    Layer,
    /// A ResnetBlock2D, whose sub-layers LDM names differently.
    Resnet { out_channels: usize },
    /// A Transformer2DModel with `depth` transformer blocks; names are shared with diffusers.
    Attention { depth: usize },
    /// LDM's `op` convolution of a Downsample2D.
    Downsample,
    /// An Upsample2D's `conv`.
    Upsample,
}

struct Block {
    diffusers: String,
    part: Part,
}

const RESNET_RENAMES: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
];

fn has_attention(block_type: &str, index: usize) -> Result<bool, String> {
    match block_type {
        "CrossAttnDownBlock2D" | "CrossAttnUpBlock2D" => Ok(true),
        "DownBlock2D" | "UpBlock2D" => Ok(false),
        other => Err(format!(
            "unet block {index} has type {other:?}, which single-file loading does not support"
        )),
    }
}

/// The LDM block prefix (e.g. `input_blocks.4.1.`) → what it is in diffusers.
fn block_table(config: &Value) -> Result<HashMap<String, Block>, String> {
    let fields = Fields::new("unet", config);
    let channels = fields.usize_list("block_out_channels", &[320, 640, 1280, 1280])?;
    let blocks = channels.len();
    let down_types = fields.strings(
        "down_block_types",
        &["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    )?;
    let up_types = fields.strings(
        "up_block_types",
        &["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    )?;
    if down_types.len() != blocks || up_types.len() != blocks {
        return Err(format!(
            "unet config has {blocks} block_out_channels but {} down and {} up block types",
            down_types.len(),
            up_types.len()
        ));
    }
    let layers = fields.usize_per_block("layers_per_block", blocks, 2)?;
    let depth = fields.usize_per_block("transformer_layers_per_block", blocks, 1)?;
    let reversed_depth = match config.get("reverse_transformer_layers_per_block") {
        Some(value) if !value.is_null() => {
            fields.usize_per_block("reverse_transformer_layers_per_block", blocks, 1)?
        }
        _ => depth.iter().rev().copied().collect(),
    };
    let reversed_layers: Vec<usize> = layers.iter().rev().copied().collect();
    let reversed_channels: Vec<usize> = channels.iter().rev().copied().collect();

    let mut table = HashMap::new();
    let mut add = |ldm: String, diffusers: String, part: Part| {
        table.insert(ldm, Block { diffusers, part });
    };
    add("input_blocks.0.0.".into(), "conv_in.".into(), Part::Layer);
    add("time_embed.0.".into(), "time_embedding.linear_1.".into(), Part::Layer);
    add("time_embed.2.".into(), "time_embedding.linear_2.".into(), Part::Layer);
    add("out.0.".into(), "conv_norm_out.".into(), Part::Layer);
    add("out.2.".into(), "conv_out.".into(), Part::Layer);
    // SDXL's pooled-text + size conditioning and SD2-unCLIP-style class projections
    // both live in `label_emb`; the config says which diffusers module receives it.
    let label_target = if fields.string("addition_embed_type")?.is_some() {
        Some("add_embedding")
    } else if fields.string("class_embed_type")?.is_some() {
        Some("class_embedding")
    } else {
        None
    };
    if let Some(target) = label_target {
        add("label_emb.0.0.".into(), format!("{target}.linear_1."), Part::Layer);
        add("label_emb.0.2.".into(), format!("{target}.linear_2."), Part::Layer);
    }

    let mut input_index = 1;
    for block in 0..blocks {
        let attention = has_attention(&down_types[block], block)?;
        for layer in 0..layers[block] {
            let resnet = Part::Resnet { out_channels: channels[block] };
            add(
                format!("input_blocks.{input_index}.0."),
                format!("down_blocks.{block}.resnets.{layer}."),
                resnet,
            );
            if attention {
                add(
                    format!("input_blocks.{input_index}.1."),
                    format!("down_blocks.{block}.attentions.{layer}."),
                    Part::Attention { depth: depth[block] },
                );
            }
            input_index += 1;
        }
        if block + 1 < blocks {
            add(
                format!("input_blocks.{input_index}.0."),
                format!("down_blocks.{block}.downsamplers.0."),
                Part::Downsample,
            );
            input_index += 1;
        }
    }

    let mid_channels = *channels.last().ok_or("unet config has no block_out_channels")?;
    let mid_resnet = Part::Resnet { out_channels: mid_channels };
    match fields.string("mid_block_type")?.unwrap_or("UNetMidBlock2DCrossAttn") {
        "UNetMidBlock2DCrossAttn" => {
            add("middle_block.0.".into(), "mid_block.resnets.0.".into(), mid_resnet);
            let mid_depth = *depth.last().expect("blocks > 0 checked above; this is a bug");
            add(
                "middle_block.1.".into(),
                "mid_block.attentions.0.".into(),
                Part::Attention { depth: mid_depth },
            );
            add("middle_block.2.".into(), "mid_block.resnets.1.".into(), mid_resnet);
        }
        "UNetMidBlock2D" => {
            add("middle_block.0.".into(), "mid_block.resnets.0.".into(), mid_resnet);
            add("middle_block.1.".into(), "mid_block.resnets.1.".into(), mid_resnet);
        }
        other => return Err(format!("unet mid_block_type {other:?} is not supported")),
    }

    let mut output_index = 0;
    for block in 0..blocks {
        let attention = has_attention(&up_types[block], block)?;
        let layer_count = reversed_layers[block] + 1;
        for layer in 0..layer_count {
            let resnet = Part::Resnet { out_channels: reversed_channels[block] };
            add(
                format!("output_blocks.{output_index}.0."),
                format!("up_blocks.{block}.resnets.{layer}."),
                resnet,
            );
            let mut next = 1;
            if attention {
                add(
                    format!("output_blocks.{output_index}.1."),
                    format!("up_blocks.{block}.attentions.{layer}."),
                    Part::Attention { depth: reversed_depth[block] },
                );
                next = 2;
            }
            if layer + 1 == layer_count && block + 1 < blocks {
                add(
                    format!("output_blocks.{output_index}.{next}."),
                    format!("up_blocks.{block}.upsamplers.0."),
                    Part::Upsample,
                );
            }
            output_index += 1;
        }
    }
    Ok(table)
}

/// Finds the block a key (without the UNet prefix) belongs to: `input_blocks.4.1.` has
/// three segments, `middle_block.1.` and `time_embed.0.` two.
fn split_block<'k>(table: &HashMap<String, Block>, key: &'k str) -> Option<(&'k str, &'k str)> {
    let mut boundaries = key.match_indices('.').map(|(at, _)| at + 1);
    let second = boundaries.nth(1)?;
    let third = boundaries.next();
    for end in third.into_iter().chain(std::iter::once(second)) {
        if table.contains_key(&key[..end]) {
            return Some((&key[..end], &key[end..]));
        }
    }
    None
}

fn map_rest(part: Part, rest: &str) -> Result<(String, Reshape), String> {
    let layer_param = |rest: &str| matches!(rest, "weight" | "bias");
    match part {
        Part::Layer if layer_param(rest) => Ok((rest.to_string(), Reshape::AsIs)),
        Part::Resnet { .. } => {
            let (module, param) = rest.rsplit_once('.').ok_or("not a resnet parameter")?;
            let renamed = RESNET_RENAMES
                .iter()
                .find(|(ldm, _)| *ldm == module)
                .map(|(_, diffusers)| *diffusers)
                .ok_or("not a resnet parameter")?;
            Ok((format!("{renamed}.{param}"), Reshape::AsIs))
        }
        Part::Attention { depth } => {
            if let Some(inner) = rest.strip_prefix("transformer_blocks.") {
                let index: usize = inner
                    .split('.')
                    .next()
                    .and_then(|index| index.parse().ok())
                    .ok_or("malformed transformer block index")?;
                if index >= depth {
                    return Err(format!(
                        "transformer block {index}, but the config gives this attention \
                         {depth} transformer layers"
                    ));
                }
            }
            Ok((rest.to_string(), Reshape::AsIs))
        }
        Part::Downsample => match rest.strip_prefix("op.") {
            Some(param) if layer_param(param) => Ok((format!("conv.{param}"), Reshape::AsIs)),
            _ => Err("not a downsampler parameter".into()),
        },
        Part::Upsample => match rest.strip_prefix("conv.") {
            Some(param) if layer_param(param) => Ok((rest.to_string(), Reshape::AsIs)),
            _ => Err("not an upsampler parameter".into()),
        },
        Part::Layer => Err("not a weight or bias".into()),
    }
}

/// Keys every block of this kind must have; the first absent one is reported.
fn required_keys(part: Part) -> Vec<String> {
    match part {
        Part::Layer => vec!["weight".into()],
        Part::Resnet { .. } => ["in_layers.0", "in_layers.2", "out_layers.0", "out_layers.3"]
            .iter()
            .chain(&["emb_layers.1"])
            .map(|module| format!("{module}.weight"))
            .collect(),
        Part::Attention { depth } => {
            let mut keys: Vec<String> =
                ["norm.weight", "proj_in.weight", "proj_out.weight"].map(String::from).to_vec();
            for index in 0..depth {
                for layer in ["attn1.to_q", "attn2.to_k", "ff.net.2"] {
                    keys.push(format!("transformer_blocks.{index}.{layer}.weight"));
                }
            }
            keys
        }
        Part::Downsample => vec!["op.weight".into()],
        Part::Upsample => vec!["conv.weight".into()],
    }
}

/// Builds the UNet plan and checks the checkpoint's shapes against the config.
pub(crate) fn unet_plan(header: &Header, config: &Value) -> Result<Plan, String> {
    let table = block_table(config)?;
    let mut plan = Plan::new();
    for name in header.sorted_names() {
        let Some(key) = name.strip_prefix(UNET_PREFIX) else {
            continue;
        };
        let (block, rest) = split_block(&table, key)
            .ok_or_else(|| format!("{name} is not part of the UNet that the config describes"))?;
        let entry = &table[block];
        let (renamed, reshape) =
            map_rest(entry.part, rest).map_err(|reason| format!("{name}: {reason}"))?;
        insert(&mut plan, format!("{}{renamed}", entry.diffusers), name, reshape)?;
    }
    let mut blocks: Vec<(&String, &Block)> = table.iter().collect();
    blocks.sort_by(|left, right| left.0.cmp(right.0));
    for (prefix, block) in blocks {
        for rest in required_keys(block.part) {
            let key = format!("{UNET_PREFIX}{prefix}{rest}");
            if !header.contains(&key) {
                return Err(format!("missing tensor {key}"));
            }
        }
    }
    check_shapes(header, config, &table)?;
    Ok(plan)
}

fn shape_of<'h>(header: &'h Header, key: &str) -> Result<&'h [usize], String> {
    header
        .shape(&format!("{UNET_PREFIX}{key}"))
        .ok_or_else(|| format!("missing tensor {UNET_PREFIX}{key}"))
}

fn expect_dim(
    key: &str,
    shape: &[usize],
    dim: usize,
    expected: usize,
    what: &str,
) -> Result<(), String> {
    match shape.get(dim) {
        Some(&actual) if actual == expected => Ok(()),
        _ => Err(format!(
            "{UNET_PREFIX}{key} has shape {shape:?}, but the config's {what} is {expected}"
        )),
    }
}

fn check_shapes(
    header: &Header,
    config: &Value,
    table: &HashMap<String, Block>,
) -> Result<(), String> {
    let fields = Fields::new("unet", config);
    let channels = fields.usize_list("block_out_channels", &[320, 640, 1280, 1280])?;
    let in_channels = fields.usize("in_channels", 4)?;
    let out_channels = fields.usize("out_channels", 4)?;
    let cross_attention_dim = fields.usize("cross_attention_dim", 1280)?;
    let first = channels[0];

    let conv_in = shape_of(header, "input_blocks.0.0.weight")?;
    expect_dim("input_blocks.0.0.weight", conv_in, 0, first, "block_out_channels[0]")?;
    expect_dim("input_blocks.0.0.weight", conv_in, 1, in_channels, "in_channels")?;
    let conv_out = shape_of(header, "out.2.weight")?;
    expect_dim("out.2.weight", conv_out, 0, out_channels, "out_channels")?;
    if let Some(projection) =
        config.get("projection_class_embeddings_input_dim").and_then(Value::as_u64)
    {
        if table.contains_key("label_emb.0.0.") {
            let shape = shape_of(header, "label_emb.0.0.weight")?;
            let what = "projection_class_embeddings_input_dim";
            expect_dim("label_emb.0.0.weight", shape, 1, projection as usize, what)?;
        }
    }
    let mut prefixes: Vec<&String> = table.keys().collect();
    prefixes.sort();
    for prefix in prefixes {
        match table[prefix].part {
            Part::Resnet { out_channels } => {
                let key = format!("{prefix}out_layers.3.weight");
                let what =
                    format!("output width of {}", table[prefix].diffusers.trim_end_matches('.'));
                expect_dim(&key, shape_of(header, &key)?, 0, out_channels, &what)?;
            }
            Part::Attention { .. } => {
                let key = format!("{prefix}transformer_blocks.0.attn2.to_k.weight");
                expect_dim(
                    &key,
                    shape_of(header, &key)?,
                    1,
                    cross_attention_dim,
                    "cross_attention_dim",
                )?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// For each diffusers UNet module path in `modules` (without `.weight`), its original
/// LDM path, as LoRA trainers that work on the LDM model name their layers (kohya's
/// SDXL LoRAs: `input_blocks.4.1.transformer_blocks.0.attn1.to_q`). Modules with no LDM
/// counterpart are left out.
pub(crate) fn ldm_aliases(
    config: &Value,
    modules: &[String],
) -> Result<Vec<(String, String)>, String> {
    let table = block_table(config)?;
    let mut aliases = Vec::new();
    for module in modules {
        let dotted = format!("{module}.");
        let Some((ldm_prefix, block)) = table
            .iter()
            .filter(|(_, block)| dotted.starts_with(&block.diffusers))
            .max_by_key(|(_, block)| block.diffusers.len())
        else {
            continue;
        };
        let rest = &module[block.diffusers.len().min(module.len())..];
        let ldm_rest = match block.part {
            Part::Layer if dotted == block.diffusers => Some(String::new()),
            Part::Resnet { .. } => RESNET_RENAMES
                .iter()
                .find(|(_, diffusers)| *diffusers == rest)
                .map(|(ldm, _)| ldm.to_string()),
            Part::Attention { .. } if !rest.is_empty() => Some(rest.to_string()),
            Part::Downsample if rest == "conv" => Some("op".to_string()),
            Part::Upsample if rest == "conv" => Some("conv".to_string()),
            _ => None,
        };
        if let Some(ldm_rest) = ldm_rest {
            let ldm = format!("{ldm_prefix}{ldm_rest}");
            aliases.push((ldm.trim_end_matches('.').to_string(), module.clone()));
        }
    }
    Ok(aliases)
}

/// Builds the plan of a ControlNet stored under the original names (`control_model.*`,
/// or bare names when `prefix` is empty), as published `.safetensors` ControlNets are:
/// the down path, mid block and time embeddings carry the UNet's LDM names;
/// `input_hint_block.N` is the control-image embedding (convolutions at even indices:
/// the first is `conv_in`, the last `conv_out`), `zero_convs.N.0` the per-skip 1×1
/// convolutions and `middle_block_out.0` the mid block's. `config` is the diffusers
/// ControlNet config.
pub(crate) fn controlnet_plan(
    header: &Header,
    prefix: &str,
    config: &Value,
) -> Result<Plan, String> {
    let fields = Fields::new("controlnet", config);
    let channels = fields.usize_list("block_out_channels", &[320, 640, 1280, 1280])?;
    let blocks = channels.len();
    let down_types = fields.strings(
        "down_block_types",
        &["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    )?;
    // The UNet table with mirrored up blocks gives the down path and mid block; the up
    // path is dropped below.
    let mut unet_like = config.clone();
    let up_types: Vec<Value> =
        down_types.iter().rev().map(|kind| Value::from(kind.replace("Down", "Up"))).collect();
    if let Some(object) = unet_like.as_object_mut() {
        object.insert("up_block_types".into(), Value::from(up_types));
        object.remove("mid_block_type");
    }
    let mut table = block_table(&unet_like)?;
    table.retain(|ldm, _| !ldm.starts_with("output_blocks.") && !ldm.starts_with("out."));
    // diffusers' ControlNet `UNetMidBlock2D` has a single resnet.
    if fields.string("mid_block_type")? == Some("UNetMidBlock2D") {
        table.remove("middle_block.1.");
        table.remove("middle_block.2.");
    }
    let layers = fields.usize_per_block("layers_per_block", blocks, 2)?;
    let skips = 1 + layers.iter().sum::<usize>() + blocks - 1;
    for index in 0..skips {
        table.insert(
            format!("zero_convs.{index}.0."),
            Block { diffusers: format!("controlnet_down_blocks.{index}."), part: Part::Layer },
        );
    }
    table.insert(
        "middle_block_out.0.".into(),
        Block { diffusers: "controlnet_mid_block.".into(), part: Part::Layer },
    );
    let hint = fields.usize_list("conditioning_embedding_out_channels", &[16, 32, 96, 256])?;
    let hint_convs = 2 * hint.len().saturating_sub(1);
    table.insert(
        "input_hint_block.0.".into(),
        Block { diffusers: "controlnet_cond_embedding.conv_in.".into(), part: Part::Layer },
    );
    for index in 0..hint_convs {
        table.insert(
            format!("input_hint_block.{}.", 2 * index + 2),
            Block {
                diffusers: format!("controlnet_cond_embedding.blocks.{index}."),
                part: Part::Layer,
            },
        );
    }
    table.insert(
        format!("input_hint_block.{}.", 2 * hint_convs + 2),
        Block { diffusers: "controlnet_cond_embedding.conv_out.".into(), part: Part::Layer },
    );

    let mut plan = Plan::new();
    for name in header.sorted_names() {
        let Some(key) = name.strip_prefix(prefix) else {
            continue;
        };
        let (block, rest) = split_block(&table, key).ok_or_else(|| {
            format!("{name} is not part of the ControlNet that the config describes")
        })?;
        let entry = &table[block];
        let (renamed, reshape) =
            map_rest(entry.part, rest).map_err(|reason| format!("{name}: {reason}"))?;
        insert(&mut plan, format!("{}{renamed}", entry.diffusers), name, reshape)?;
    }
    let mut prefixes: Vec<(&String, &Block)> = table.iter().collect();
    prefixes.sort_by(|left, right| left.0.cmp(right.0));
    for (block_prefix, block) in prefixes {
        for rest in required_keys(block.part) {
            let key = format!("{prefix}{block_prefix}{rest}");
            if !header.contains(&key) {
                return Err(format!("missing tensor {key}"));
            }
        }
    }
    Ok(plan)
}
