//! Key-mapping tests on tiny synthetic checkpoints written in the original layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::*;

/// Distinct values per tensor, so a tensor mapped to the wrong name is caught.
struct Builder {
    tensors: HashMap<String, Tensor>,
    counter: f32,
}

impl Builder {
    fn new() -> Self {
        Builder { tensors: HashMap::new(), counter: 0.0 }
    }

    fn add(&mut self, name: &str, shape: &[usize]) {
        let count: usize = shape.iter().product();
        self.counter += 1000.0;
        let values: Vec<f32> = (0..count).map(|index| self.counter + index as f32).collect();
        let tensor =
            Tensor::from_vec(values, shape, &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
        self.tensors.insert(name.to_string(), tensor);
    }

    fn layer(&mut self, prefix: &str, weight: &[usize]) {
        self.add(&format!("{prefix}weight"), weight);
        self.add(&format!("{prefix}bias"), &weight[..1]);
    }

    fn unet_resnet(&mut self, prefix: &str, input: usize, output: usize) {
        self.layer(&format!("{prefix}in_layers.0."), &[input]);
        self.layer(&format!("{prefix}in_layers.2."), &[output, input, 3, 3]);
        self.layer(&format!("{prefix}emb_layers.1."), &[output, 32]);
        self.layer(&format!("{prefix}out_layers.0."), &[output]);
        self.layer(&format!("{prefix}out_layers.3."), &[output, output, 3, 3]);
        if input != output {
            self.layer(&format!("{prefix}skip_connection."), &[output, input, 1, 1]);
        }
    }

    fn unet_attention(&mut self, prefix: &str, channels: usize, context: usize) {
        self.layer(&format!("{prefix}norm."), &[channels]);
        self.layer(&format!("{prefix}proj_in."), &[channels, channels, 1, 1]);
        let block = format!("{prefix}transformer_blocks.0.");
        for attention in ["attn1", "attn2"] {
            let source = if attention == "attn1" { channels } else { context };
            self.add(&format!("{block}{attention}.to_q.weight"), &[channels, channels]);
            self.add(&format!("{block}{attention}.to_k.weight"), &[channels, source]);
            self.add(&format!("{block}{attention}.to_v.weight"), &[channels, source]);
            self.layer(&format!("{block}{attention}.to_out.0."), &[channels, channels]);
        }
        self.layer(&format!("{block}ff.net.0.proj."), &[channels * 8, channels]);
        self.layer(&format!("{block}ff.net.2."), &[channels, channels * 4]);
        for norm in ["norm1", "norm2", "norm3"] {
            self.layer(&format!("{block}{norm}."), &[channels]);
        }
        self.layer(&format!("{prefix}proj_out."), &[channels, channels, 1, 1]);
    }

    /// UNet of [`tiny_unet_config`]: blocks (8, cross-attn) and (16, plain), one layer each.
    fn unet(&mut self, context: usize, label_input: Option<usize>) {
        let p = "model.diffusion_model.";
        self.layer(&format!("{p}input_blocks.0.0."), &[8, 4, 3, 3]);
        self.layer(&format!("{p}time_embed.0."), &[32, 8]);
        self.layer(&format!("{p}time_embed.2."), &[32, 32]);
        if let Some(input) = label_input {
            self.layer(&format!("{p}label_emb.0.0."), &[32, input]);
            self.layer(&format!("{p}label_emb.0.2."), &[32, 32]);
        }
        self.unet_resnet(&format!("{p}input_blocks.1.0."), 8, 8);
        self.unet_attention(&format!("{p}input_blocks.1.1."), 8, context);
        self.layer(&format!("{p}input_blocks.2.0.op."), &[8, 8, 3, 3]);
        self.unet_resnet(&format!("{p}input_blocks.3.0."), 8, 16);
        self.unet_resnet(&format!("{p}middle_block.0."), 16, 16);
        self.unet_attention(&format!("{p}middle_block.1."), 16, context);
        self.unet_resnet(&format!("{p}middle_block.2."), 16, 16);
        self.unet_resnet(&format!("{p}output_blocks.0.0."), 32, 16);
        self.unet_resnet(&format!("{p}output_blocks.1.0."), 24, 16);
        self.layer(&format!("{p}output_blocks.1.1.conv."), &[16, 16, 3, 3]);
        self.unet_resnet(&format!("{p}output_blocks.2.0."), 24, 8);
        self.unet_attention(&format!("{p}output_blocks.2.1."), 8, context);
        self.unet_resnet(&format!("{p}output_blocks.3.0."), 16, 8);
        self.unet_attention(&format!("{p}output_blocks.3.1."), 8, context);
        self.layer(&format!("{p}out.0."), &[8]);
        self.layer(&format!("{p}out.2."), &[4, 8, 3, 3]);
    }

    fn vae_resnet(&mut self, prefix: &str, input: usize, output: usize) {
        self.layer(&format!("{prefix}norm1."), &[input]);
        self.layer(&format!("{prefix}conv1."), &[output, input, 3, 3]);
        self.layer(&format!("{prefix}norm2."), &[output]);
        self.layer(&format!("{prefix}conv2."), &[output, output, 3, 3]);
        if input != output {
            self.layer(&format!("{prefix}nin_shortcut."), &[output, input, 1, 1]);
        }
    }

    /// VAE of [`tiny_vae_config`]: widths (4, 8), one layer per block, 2 latent channels.
    fn vae(&mut self) {
        let p = "first_stage_model.";
        self.layer(&format!("{p}encoder.conv_in."), &[4, 3, 3, 3]);
        self.vae_resnet(&format!("{p}encoder.down.0.block.0."), 4, 4);
        self.layer(&format!("{p}encoder.down.0.downsample.conv."), &[4, 4, 3, 3]);
        self.vae_resnet(&format!("{p}encoder.down.1.block.0."), 4, 8);
        for coder in ["encoder", "decoder"] {
            self.vae_resnet(&format!("{p}{coder}.mid.block_1."), 8, 8);
            let attention = format!("{p}{coder}.mid.attn_1.");
            self.layer(&format!("{attention}norm."), &[8]);
            for projection in ["q", "k", "v", "proj_out"] {
                self.layer(&format!("{attention}{projection}."), &[8, 8, 1, 1]);
            }
            self.vae_resnet(&format!("{p}{coder}.mid.block_2."), 8, 8);
            self.layer(&format!("{p}{coder}.norm_out."), &[if coder == "encoder" { 8 } else { 4 }]);
        }
        self.layer(&format!("{p}encoder.conv_out."), &[4, 8, 3, 3]);
        self.layer(&format!("{p}quant_conv."), &[4, 4, 1, 1]);
        self.layer(&format!("{p}post_quant_conv."), &[2, 2, 1, 1]);
        self.layer(&format!("{p}decoder.conv_in."), &[8, 2, 3, 3]);
        self.vae_resnet(&format!("{p}decoder.up.1.block.0."), 8, 8);
        self.vae_resnet(&format!("{p}decoder.up.1.block.1."), 8, 8);
        self.layer(&format!("{p}decoder.up.1.upsample.conv."), &[8, 8, 3, 3]);
        self.vae_resnet(&format!("{p}decoder.up.0.block.0."), 8, 4);
        self.vae_resnet(&format!("{p}decoder.up.0.block.1."), 4, 4);
        self.layer(&format!("{p}decoder.conv_out."), &[3, 4, 3, 3]);
    }

    /// HF-layout CLIP with two layers, hidden 12.
    fn hf_clip(&mut self, prefix: &str) {
        self.add(&format!("{prefix}embeddings.token_embedding.weight"), &[20, 12]);
        self.add(&format!("{prefix}embeddings.position_embedding.weight"), &[6, 12]);
        self.add(&format!("{prefix}embeddings.position_ids"), &[1, 6]);
        for layer in 0..2 {
            let base = format!("{prefix}encoder.layers.{layer}.");
            for module in
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
            {
                self.layer(&format!("{base}{module}."), &[12, 12]);
            }
            self.layer(&format!("{base}layer_norm1."), &[12]);
            self.layer(&format!("{base}layer_norm2."), &[12]);
            self.layer(&format!("{base}mlp.fc1."), &[24, 12]);
            self.layer(&format!("{base}mlp.fc2."), &[12, 24]);
        }
        self.layer(&format!("{prefix}final_layer_norm."), &[12]);
    }

    /// OpenCLIP-layout encoder with `layers` resblocks, hidden `width`, projection 10.
    fn open_clip(&mut self, prefix: &str, layers: usize, width: usize) {
        self.add(&format!("{prefix}token_embedding.weight"), &[20, width]);
        self.add(&format!("{prefix}positional_embedding"), &[6, width]);
        self.add(&format!("{prefix}text_projection"), &[width, 10]);
        self.add(&format!("{prefix}logit_scale"), &[]);
        for layer in 0..layers {
            let base = format!("{prefix}transformer.resblocks.{layer}.");
            self.add(&format!("{base}attn.in_proj_weight"), &[3 * width, width]);
            self.add(&format!("{base}attn.in_proj_bias"), &[3 * width]);
            self.layer(&format!("{base}attn.out_proj."), &[width, width]);
            self.layer(&format!("{base}ln_1."), &[width]);
            self.layer(&format!("{base}ln_2."), &[width]);
            self.layer(&format!("{base}mlp.c_fc."), &[2 * width, width]);
            self.layer(&format!("{base}mlp.c_proj."), &[width, 2 * width]);
        }
        self.layer(&format!("{prefix}ln_final."), &[width]);
    }

    fn write(&self, dir: &Path, stem: &str, sidecar: Option<&Value>) -> PathBuf {
        let path = dir.join(format!("{stem}.safetensors"));
        candle_core::safetensors::save(&self.tensors, &path).unwrap();
        if let Some(sidecar) = sidecar {
            std::fs::write(dir.join(format!("{stem}.config.json")), sidecar.to_string()).unwrap();
        }
        path
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sdserve-single-file-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny_unet_config(context: usize, sdxl: bool) -> Value {
    let mut config = json!({
        "block_out_channels": [8, 16], "layers_per_block": 1, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": context, "attention_head_dim": 2, "norm_num_groups": 4,
    });
    if sdxl {
        config["addition_embed_type"] = json!("text_time");
        config["projection_class_embeddings_input_dim"] = json!(40);
    }
    config
}

fn tiny_vae_config() -> Value {
    json!({"block_out_channels": [4, 8], "layers_per_block": 1, "latent_channels": 2, "norm_num_groups": 2})
}

fn tiny_clip_config(hidden: usize, layers: usize) -> Value {
    json!({"hidden_size": hidden, "num_hidden_layers": layers, "vocab_size": 20,
           "max_position_embeddings": 6, "intermediate_size": 2 * hidden, "num_attention_heads": 2})
}

fn scheduler() -> Value {
    json!({"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon"})
}

fn tiny_sd1(text_model_level: bool) -> (Builder, Value) {
    let mut builder = Builder::new();
    builder.unet(12, None);
    builder.vae();
    let prefix = if text_model_level {
        "cond_stage_model.transformer.text_model."
    } else {
        "cond_stage_model.transformer."
    };
    builder.hf_clip(prefix);
    builder.add("model_ema.decay", &[]);
    builder.add("model_ema.diffusion_modelinput_blocks00weight", &[8, 4, 3, 3]);
    let sidecar = json!({
        "family": "sd1", "unet": tiny_unet_config(12, false), "vae": tiny_vae_config(),
        "text_encoder": tiny_clip_config(12, 2), "scheduler": scheduler(),
    });
    (builder, sidecar)
}

fn values(tensor: &Tensor) -> Vec<f32> {
    tensor.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_same(converted: &Tensor, source: &Tensor) {
    assert_eq!(converted.dims(), source.dims());
    assert_eq!(values(converted), values(source));
}

#[test]
fn sd1_keys_map_to_diffusers_names() {
    let dir = temp_dir("sd1");
    let (builder, sidecar) = tiny_sd1(true);
    let path = builder.write(&dir, "tiny", Some(&sidecar));
    assert_eq!(detect_family(&path).unwrap(), ModelFamily::Sd1);
    let converted = load_single_file(&path, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(converted.family, ModelFamily::Sd1);
    assert_eq!(converted.configs["unet"], sidecar["unet"]);
    let components: Vec<&str> = converted.components.keys().map(String::as_str).collect();
    assert_eq!(components, ["text_encoder", "unet", "vae"]);

    let source = |name: &str| &builder.tensors[name];
    let unet = &converted.components["unet"];
    let unet_sources =
        builder.tensors.keys().filter(|name| name.starts_with("model.diffusion_model.")).count();
    assert_eq!(unet.len(), unet_sources, "every UNet tensor is converted once");
    for (diffusers, ldm) in [
        ("conv_in.weight", "input_blocks.0.0.weight"),
        ("time_embedding.linear_2.bias", "time_embed.2.bias"),
        ("down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
        ("down_blocks.0.resnets.0.time_emb_proj.weight", "input_blocks.1.0.emb_layers.1.weight"),
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        ),
        ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.2.0.op.weight"),
        ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.3.0.skip_connection.weight"),
        ("mid_block.attentions.0.proj_in.weight", "middle_block.1.proj_in.weight"),
        ("mid_block.resnets.1.conv2.weight", "middle_block.2.out_layers.3.weight"),
        ("up_blocks.0.resnets.1.norm2.bias", "output_blocks.1.0.out_layers.0.bias"),
        ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.1.1.conv.weight"),
        ("up_blocks.1.attentions.1.proj_out.weight", "output_blocks.3.1.proj_out.weight"),
        ("up_blocks.1.resnets.0.conv1.weight", "output_blocks.2.0.in_layers.2.weight"),
        ("conv_norm_out.weight", "out.0.weight"),
        ("conv_out.bias", "out.2.bias"),
    ] {
        let converted = unet.get(diffusers).unwrap_or_else(|| panic!("missing {diffusers}"));
        assert_same(converted, source(&format!("model.diffusion_model.{ldm}")));
    }
    assert_eq!(unet["conv_in.weight"].dtype(), DType::F32);

    let vae = &converted.components["vae"];
    let vae_sources =
        builder.tensors.keys().filter(|name| name.starts_with("first_stage_model.")).count();
    assert_eq!(vae.len(), vae_sources);
    for (diffusers, ldm) in [
        ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
        (
            "encoder.down_blocks.0.downsamplers.0.conv.weight",
            "encoder.down.0.downsample.conv.weight",
        ),
        (
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            "encoder.down.1.block.0.nin_shortcut.weight",
        ),
        ("decoder.up_blocks.0.resnets.1.conv1.weight", "decoder.up.1.block.1.conv1.weight"),
        ("decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up.1.upsample.conv.weight"),
        (
            "decoder.up_blocks.1.resnets.0.conv_shortcut.bias",
            "decoder.up.0.block.0.nin_shortcut.bias",
        ),
        ("decoder.mid_block.resnets.1.norm2.weight", "decoder.mid.block_2.norm2.weight"),
        ("encoder.mid_block.attentions.0.group_norm.bias", "encoder.mid.attn_1.norm.bias"),
        ("post_quant_conv.weight", "post_quant_conv.weight"),
    ] {
        let converted = vae.get(diffusers).unwrap_or_else(|| panic!("missing {diffusers}"));
        assert_same(converted, source(&format!("first_stage_model.{ldm}")));
    }
    let to_q = &vae["decoder.mid_block.attentions.0.to_q.weight"];
    assert_eq!(to_q.dims(), [8, 8], "1x1 conv attention weights become linear weights");
    assert_eq!(values(to_q), values(source("first_stage_model.decoder.mid.attn_1.q.weight")));
    assert!(vae.contains_key("encoder.mid_block.attentions.0.to_out.0.bias"));

    let clip = &converted.components["text_encoder"];
    assert!(!clip.keys().any(|name| name.contains("position_ids")));
    assert_eq!(clip.len(), 4 + 2 * 16, "embeddings, final norm and two layers");
    assert_same(
        &clip["text_model.encoder.layers.1.mlp.fc2.weight"],
        source("cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight"),
    );
}

#[test]
fn sd1_clip_without_text_model_level_is_accepted() {
    let dir = temp_dir("sd1-flat");
    let (builder, sidecar) = tiny_sd1(false);
    let path = builder.write(&dir, "flat", Some(&sidecar));
    let converted = load_single_file(&path, &Device::Cpu, DType::F16).unwrap();
    let clip = &converted.components["text_encoder"];
    assert_same(
        &clip["text_model.final_layer_norm.weight"],
        &builder.tensors["cond_stage_model.transformer.final_layer_norm.weight"],
    );
}

#[test]
fn open_clip_is_split_and_truncated_to_the_configured_layers() {
    let dir = temp_dir("sd2");
    let mut builder = Builder::new();
    builder.unet(12, None);
    builder.vae();
    // Three resblocks on disk, two in the config: the last one is dropped as in diffusers.
    builder.open_clip("cond_stage_model.model.", 3, 12);
    let sidecar = json!({
        "family": "sd2", "unet": tiny_unet_config(12, false), "vae": tiny_vae_config(),
        "text_encoder": tiny_clip_config(12, 2), "scheduler": scheduler(),
    });
    let path = builder.write(&dir, "tiny", Some(&sidecar));
    assert_eq!(detect_family(&path).unwrap(), ModelFamily::Sd2);
    let converted = load_single_file(&path, &Device::Cpu, DType::F32).unwrap();
    let clip = &converted.components["text_encoder"];
    assert_eq!(clip.len(), 4 + 2 * 16, "embeddings, final norm, two layers; no projection");
    assert!(!clip.contains_key("text_projection.weight"));
    assert!(!clip.keys().any(|name| name.contains("layers.2.")));
    let fused = values(
        &builder.tensors["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"],
    );
    for (index, projection) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
        let part = &clip[&format!("text_model.encoder.layers.1.self_attn.{projection}.weight")];
        assert_eq!(part.dims(), [12, 12]);
        assert_eq!(values(part), fused[index * 144..(index + 1) * 144]);
        let bias = &clip[&format!("text_model.encoder.layers.1.self_attn.{projection}.bias")];
        assert_eq!(bias.dims(), [12]);
    }
    assert_same(
        &clip["text_model.encoder.layers.0.mlp.fc1.weight"],
        &builder.tensors["cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight"],
    );
    assert_same(
        &clip["text_model.embeddings.position_embedding.weight"],
        &builder.tensors["cond_stage_model.model.positional_embedding"],
    );
}

fn tiny_sdxl(refiner: bool) -> (Builder, Value) {
    let mut builder = Builder::new();
    builder.unet(if refiner { 16 } else { 28 }, Some(40));
    builder.vae();
    let mut sidecar = json!({
        "vae": tiny_vae_config(), "text_encoder_2": tiny_clip_config(16, 2), "scheduler": scheduler(),
    });
    if refiner {
        builder.open_clip("conditioner.embedders.0.model.", 2, 16);
        sidecar["unet"] = tiny_unet_config(16, true);
    } else {
        builder.hf_clip("conditioner.embedders.0.transformer.text_model.");
        builder.open_clip("conditioner.embedders.1.model.", 2, 16);
        sidecar["unet"] = tiny_unet_config(28, true);
        sidecar["text_encoder"] = tiny_clip_config(12, 2);
    }
    (builder, sidecar)
}

#[test]
fn sdxl_base_and_refiner_convert_with_projection_and_add_embedding() {
    for refiner in [false, true] {
        let dir = temp_dir(if refiner { "refiner" } else { "sdxl" });
        let (builder, sidecar) = tiny_sdxl(refiner);
        let path = builder.write(&dir, "tiny", Some(&sidecar));
        let family = if refiner { ModelFamily::SdxlRefiner } else { ModelFamily::Sdxl };
        assert_eq!(detect_family(&path).unwrap(), family);
        let converted = load_single_file(&path, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(converted.family, family);
        assert_eq!(converted.components.contains_key("text_encoder"), !refiner);
        let unet = &converted.components["unet"];
        assert_same(
            &unet["add_embedding.linear_1.weight"],
            &builder.tensors["model.diffusion_model.label_emb.0.0.weight"],
        );
        let prefix = if refiner {
            "conditioner.embedders.0.model."
        } else {
            "conditioner.embedders.1.model."
        };
        let projection = &converted.components["text_encoder_2"]["text_projection.weight"];
        let stored = &builder.tensors[&format!("{prefix}text_projection")];
        assert_eq!(projection.dims(), [10, 16], "OpenCLIP [in, out] becomes a linear [out, in]");
        assert_same(projection, &stored.t().unwrap());
    }
}

#[test]
fn tiny_weights_without_sidecar_ask_for_one() {
    let dir = temp_dir("no-sidecar");
    let (builder, _) = tiny_sd1(true);
    let path = builder.write(&dir, "tiny", None);
    assert_eq!(detect_family(&path).unwrap(), ModelFamily::Sd1);
    let error = read_configs(&path).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, ModelError::UnknownLayout { .. }), "{message}");
    assert!(message.contains("sidecar") && message.contains("tiny.config.json"), "{message}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = temp_dir("missing");
    let (mut builder, sidecar) = tiny_sd1(true);
    builder.tensors.remove("model.diffusion_model.output_blocks.2.0.in_layers.2.weight");
    let path = builder.write(&dir, "tiny", Some(&sidecar));
    let message = load_single_file(&path, &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(
        message
            .contains("missing tensor model.diffusion_model.output_blocks.2.0.in_layers.2.weight"),
        "{message}"
    );
}

#[test]
fn sidecar_that_does_not_fit_is_blamed() {
    let dir = temp_dir("bad-sidecar");
    let (builder, mut sidecar) = tiny_sd1(true);
    sidecar["unet"]["layers_per_block"] = json!(2);
    let path = builder.write(&dir, "tiny", Some(&sidecar));
    match read_configs(&path) {
        Err(ModelError::BadConfig { path, reason }) => {
            assert!(path.ends_with("tiny.config.json"));
            assert!(reason.contains("unet"), "{reason}");
        }
        other => panic!("expected BadConfig, got {:?}", other.map(|(family, _)| family)),
    }
    sidecar = json!({"family": "sdxl"});
    std::fs::write(dir.join("tiny.config.json"), sidecar.to_string()).unwrap();
    let message = read_configs(&path).err().unwrap().to_string();
    assert!(message.contains("\"sdxl\"") && message.contains("sd1 layout"), "{message}");
}

#[test]
fn unknown_layouts_say_what_the_file_looks_like() {
    let dir = temp_dir("unknown");
    let cases: [(&str, &[&str], &str); 4] = [
        ("lora", &["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
        ("vae", &["encoder.down.0.block.0.conv1.weight", "decoder.conv_in.weight"], "VAE-only"),
        ("diffusers", &["down_blocks.0.resnets.0.conv1.weight"], "diffusers"),
        ("unet-only", &["model.diffusion_model.input_blocks.0.0.weight"], "no text encoder"),
    ];
    for (stem, names, expected) in cases {
        let mut builder = Builder::new();
        for name in names {
            builder.add(name, &[2]);
        }
        let path = builder.write(&dir, stem, None);
        match detect_family(&path) {
            Err(ModelError::UnknownLayout { reason, .. }) => {
                assert!(reason.contains(expected), "{stem}: {reason}")
            }
            other => panic!("{stem}: expected UnknownLayout, got {other:?}"),
        }
    }
}

#[test]
fn sd2_variant_follows_markers_and_defaults_to_v_prediction() {
    let mut header = header::Header::default();
    assert_eq!(sd2_variant(&header, None), Sd2Variant::V768);
    assert_eq!(sd2_variant(&header, Some(875_000)), Sd2Variant::Base512);
    header.metadata.insert("modelspec.prediction_type".into(), "epsilon".into());
    assert_eq!(sd2_variant(&header, None), Sd2Variant::Base512);
    header.tensors.insert(
        "v_pred".into(),
        header::TensorEntry { dtype: "F32".into(), shape: vec![], start: 0, end: 4 },
    );
    assert_eq!(sd2_variant(&header, None), Sd2Variant::V768);
}

#[test]
fn pickles_are_refused_before_reading() {
    let dir = temp_dir("pickle");
    for name in ["model.ckpt", "model.pt", "model.pth", "model.bin"] {
        let path = dir.join(name);
        std::fs::write(&path, b"\x80\x02}q\x00.").unwrap();
        assert!(matches!(
            load_single_file(&path, &Device::Cpu, DType::F32),
            Err(ModelError::PickleRefused(_))
        ));
        assert!(matches!(detect_family(&path), Err(ModelError::PickleRefused(_))));
    }
    let missing = dir.join("absent.safetensors");
    assert!(matches!(read_configs(&missing), Err(ModelError::NotFound(_))));
}
