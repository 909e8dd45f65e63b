//! The VAE's original (LDM `first_stage_model`) key layout → diffusers names. LDM's
//! decoder numbers its `up` levels from the highest resolution, diffusers from the lowest,
//! and the mid-block attention is stored as 1x1 convolutions that diffusers keeps as linears.

use std::collections::HashMap;

use serde_json::Value;

use super::fields::Fields;
use super::header::Header;
use super::plan::{insert, Plan, Reshape};

/// Where the VAE lives inside an original checkpoint.
pub(crate) const VAE_PREFIX: &str = "first_stage_model.";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    Layer,
    Resnet {
        out_channels: usize,
    },
    Attention,
    /// Down- or upsampler: a `conv` inside.
    Sampler,
}

struct Block {
    diffusers: String,
    part: Part,
}

fn block_table(config: &Value) -> Result<HashMap<String, Block>, String> {
    let fields = Fields::new("vae", config);
    let channels = fields.usize_list("block_out_channels", &[64])?;
    let levels = channels.len();
    if levels == 0 {
        return Err("vae config has empty block_out_channels".into());
    }
    let layers = fields.usize("layers_per_block", 1)?;
    let mid_attention = fields.bool("mid_block_add_attention", true)?;
    let top = *channels.last().expect("levels > 0 checked above; this is a bug");

    let mut table = HashMap::new();
    let mut add = |ldm: String, diffusers: String, part: Part| {
        table.insert(ldm, Block { diffusers, part });
    };
    for coder in ["encoder", "decoder"] {
        add(format!("{coder}.conv_in."), format!("{coder}.conv_in."), Part::Layer);
        add(format!("{coder}.conv_out."), format!("{coder}.conv_out."), Part::Layer);
        add(format!("{coder}.norm_out."), format!("{coder}.conv_norm_out."), Part::Layer);
        let resnet = Part::Resnet { out_channels: top };
        add(format!("{coder}.mid.block_1."), format!("{coder}.mid_block.resnets.0."), resnet);
        add(format!("{coder}.mid.block_2."), format!("{coder}.mid_block.resnets.1."), resnet);
        if mid_attention {
            add(
                format!("{coder}.mid.attn_1."),
                format!("{coder}.mid_block.attentions.0."),
                Part::Attention,
            );
        }
    }
    add("quant_conv.".into(), "quant_conv.".into(), Part::Layer);
    add("post_quant_conv.".into(), "post_quant_conv.".into(), Part::Layer);
    for (level, &width) in channels.iter().enumerate() {
        let resnet = Part::Resnet { out_channels: width };
        for layer in 0..layers {
            add(
                format!("encoder.down.{level}.block.{layer}."),
                format!("encoder.down_blocks.{level}.resnets.{layer}."),
                resnet,
            );
        }
        if level + 1 < levels {
            add(
                format!("encoder.down.{level}.downsample."),
                format!("encoder.down_blocks.{level}.downsamplers.0."),
                Part::Sampler,
            );
        }
        let up_block = levels - 1 - level;
        for layer in 0..layers + 1 {
            add(
                format!("decoder.up.{level}.block.{layer}."),
                format!("decoder.up_blocks.{up_block}.resnets.{layer}."),
                resnet,
            );
        }
        if level > 0 {
            add(
                format!("decoder.up.{level}.upsample."),
                format!("decoder.up_blocks.{up_block}.upsamplers.0."),
                Part::Sampler,
            );
        }
    }
    Ok(table)
}

/// Block prefixes have two (`quant_conv.`), three (`encoder.mid.block_1.`) or five
/// (`decoder.up.2.block.0.`) segments; the longest registered one wins.
fn split_block<'k>(table: &HashMap<String, Block>, key: &'k str) -> Option<(&'k str, &'k str)> {
    let ends: Vec<usize> = key.match_indices('.').map(|(at, _)| at + 1).collect();
    ends.iter()
        .rev()
        .map(|&end| (&key[..end], &key[end..]))
        .find(|(block, _)| table.contains_key(*block))
}

fn map_rest(part: Part, rest: &str) -> Result<(String, Reshape), String> {
    let (module, param) = match rest.rsplit_once('.') {
        Some((module, param)) => (module, param),
        None => ("", rest),
    };
    if !matches!(param, "weight" | "bias") {
        return Err("not a weight or bias".into());
    }
    let module = match (part, module) {
        (Part::Layer, "") => return Ok((param.to_string(), Reshape::AsIs)),
        (Part::Resnet { .. }, "norm1" | "conv1" | "norm2" | "conv2") => module,
        (Part::Resnet { .. }, "nin_shortcut") => "conv_shortcut",
        (Part::Sampler, "conv") => module,
        (Part::Attention, "norm") => "group_norm",
        (Part::Attention, "q") => "to_q",
        (Part::Attention, "k") => "to_k",
        (Part::Attention, "v") => "to_v",
        (Part::Attention, "proj_out") => "to_out.0",
        _ => return Err("not a parameter of this block".into()),
    };
    let reshape = if part == Part::Attention { Reshape::ConvToLinear } else { Reshape::AsIs };
    Ok((format!("{module}.{param}"), reshape))
}

fn required_keys(part: Part) -> &'static [&'static str] {
    match part {
        Part::Layer => &["weight"],
        Part::Resnet { .. } => &["norm1.weight", "conv1.weight", "norm2.weight", "conv2.weight"],
        Part::Attention => &["norm.weight", "q.weight", "k.weight", "v.weight", "proj_out.weight"],
        Part::Sampler => &["conv.weight"],
    }
}

/// Builds the VAE plan and checks the checkpoint's shapes against the config.
pub(crate) fn vae_plan(header: &Header, config: &Value) -> Result<Plan, String> {
    if !header.has_prefix(VAE_PREFIX) {
        return Err(format!("the checkpoint has no VAE ({VAE_PREFIX}* keys)"));
    }
    let table = block_table(config)?;
    let mut plan = Plan::new();
    for name in header.sorted_names() {
        let Some(key) = name.strip_prefix(VAE_PREFIX) else {
            continue;
        };
        // Some training exports keep the autoencoder's discriminator/LPIPS loss weights.
        if key.starts_with("loss.") {
            continue;
        }
        let (block, rest) = split_block(&table, key)
            .ok_or_else(|| format!("{name} is not part of the VAE that the config describes"))?;
        let entry = &table[block];
        let (renamed, reshape) =
            map_rest(entry.part, rest).map_err(|reason| format!("{name}: {reason}"))?;
        insert(&mut plan, format!("{}{renamed}", entry.diffusers), name, reshape)?;
    }
    let mut prefixes: Vec<&String> = table.keys().collect();
    prefixes.sort();
    for prefix in &prefixes {
        for rest in required_keys(table[*prefix].part) {
            let key = format!("{VAE_PREFIX}{prefix}{rest}");
            if !header.contains(&key) {
                return Err(format!("missing tensor {key}"));
            }
        }
    }
    check_shapes(header, config, &table, &prefixes)?;
    Ok(plan)
}

fn check_shapes(
    header: &Header,
    config: &Value,
    table: &HashMap<String, Block>,
    prefixes: &[&String],
) -> Result<(), String> {
    let fields = Fields::new("vae", config);
    let channels = fields.usize_list("block_out_channels", &[64])?;
    let in_channels = fields.usize("in_channels", 3)?;
    let latent_channels = fields.usize("latent_channels", 4)?;
    let check = |key: &str, dim: usize, expected: usize, what: &str| -> Result<(), String> {
        let full = format!("{VAE_PREFIX}{key}");
        let shape = header.shape(&full).ok_or_else(|| format!("missing tensor {full}"))?;
        match shape.get(dim) {
            Some(&actual) if actual == expected => Ok(()),
            _ => Err(format!("{full} has shape {shape:?}, but the config's {what} is {expected}")),
        }
    };
    check("encoder.conv_in.weight", 0, channels[0], "block_out_channels[0]")?;
    check("encoder.conv_in.weight", 1, in_channels, "in_channels")?;
    check("post_quant_conv.weight", 0, latent_channels, "latent_channels")?;
    for prefix in prefixes {
        if let Part::Resnet { out_channels } = table[*prefix].part {
            let what = format!("width of {}", table[*prefix].diffusers.trim_end_matches('.'));
            check(&format!("{prefix}conv2.weight"), 0, out_channels, &what)?;
        }
    }
    Ok(())
}
