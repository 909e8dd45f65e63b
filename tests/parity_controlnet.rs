//! ControlNet parity with diffusers: the tiny fixture models with tiny random ControlNets
//! (tests/fixtures/controlnets), the control images of tests/fixtures/images, seed 42,
//! 6 steps must give diffusers' final latents (max |Δ| ≤ 1e-3) and image (max |Δ| ≤ 2/255
//! on RGB8). Cases vary the scale, the guidance window (start/end), guess mode (with and
//! without classifier-free guidance), the sampler, n, and one versus two ControlNets.
//! References: tests/fixtures/reference/controlnet_<family>.{json,safetensors}, made by
//! tools/make_controlnet_fixtures.py with StableDiffusionControlNetPipeline /
//! StableDiffusionXLControlNetPipeline (MultiControlNetModel for two).
//!
//! Also: the single-file ControlNet (original `control_model.*` names) loads to exactly
//! the folder's weights, and a ControlNet for another family is refused by name.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sdserve::adapters::controlnet::ControlNetLibrary;
use sdserve::codec::base64_encode;
use sdserve::pipeline::{ControlNetParams, GenerationParams, LoadOptions, NoObserver, Pipeline};
use serde_json::Value;

const LATENT_TOLERANCE: f32 = 1e-3;
const IMAGE_TOLERANCE: u8 = 2;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn image_base64(relative: &str) -> String {
    base64_encode(&std::fs::read(fixtures().join(relative)).unwrap())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn pipeline_for(family: &str) -> Pipeline {
    let library = ControlNetLibrary::new(vec![fixtures().join("controlnets").join(family)], 4);
    Pipeline::load("fixture", &fixtures().join(family), &LoadOptions::default())
        .unwrap()
        .with_controlnet_library(Arc::new(library))
}

fn params_for(case: &Value) -> GenerationParams {
    let controlnets = case["controlnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|unit| ControlNetParams {
            model: unit["model"].as_str().unwrap().into(),
            image: image_base64(unit["image"].as_str().unwrap()),
            scale: unit["scale"].as_f64(),
            start: unit["start"].as_f64(),
            end: unit["end"].as_f64(),
        })
        .collect();
    GenerationParams {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: Some(case["negative_prompt"].as_str().unwrap().into()),
        steps: Some(case["steps"].as_u64().unwrap() as u32),
        guidance_scale: case["guidance_scale"].as_f64(),
        sampler: Some(case["sampler"].as_str().unwrap().into()),
        seed: case["seed"].as_i64(),
        n: Some(case["n"].as_u64().unwrap() as u32),
        controlnets,
        guess_mode: case["guess_mode"].as_bool(),
        ..Default::default()
    }
}

fn check_family(family: &str) {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("reference/controlnet_{family}.json")))
            .unwrap(),
    )
    .unwrap();
    let refs: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join(format!("reference/controlnet_{family}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let pipeline = pipeline_for(family);
    let mut failures = Vec::new();
    for (name, case) in meta["cases"].as_object().unwrap() {
        let request = params_for(case).validate(pipeline.defaults(), &Default::default()).unwrap();
        assert_eq!((request.width, request.height), (64, 64), "size from the control image");
        let latents = pipeline.denoise(&request, &mut NoObserver).unwrap();
        let latent_diff = max_abs_diff(&latents, &refs[&format!("{name}.latents")]);
        let images = pipeline.generate(&request, &mut NoObserver).unwrap();
        let actual: Vec<u8> = images.iter().flat_map(|image| image.rgb.clone()).collect();
        let expected = refs[&format!("{name}.image")].to_dtype(DType::U8).unwrap();
        let expected = expected.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(actual.len(), expected.len(), "{family}/{name}: image size");
        let image_diff = actual.iter().zip(&expected).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        println!(
            "{family}/{name}: latents max |Δ| = {latent_diff:e}, image max |Δ| = {image_diff}/255"
        );
        if latent_diff > LATENT_TOLERANCE || image_diff > IMAGE_TOLERANCE {
            failures.push(format!("{name}: latents {latent_diff}, image {image_diff}"));
        }
    }
    assert!(failures.is_empty(), "{family}: {failures:?}");
}

#[test]
fn sd1_controlnets_match_diffusers() {
    check_family("sd1");
}

#[test]
fn sdxl_controlnets_match_diffusers() {
    check_family("sdxl");
}

/// The ControlNet changes the image: the same request without it differs from the
/// reference (so the parity above is not parity of an ignored input).
#[test]
fn the_controlnet_changes_the_result() {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/controlnet_sd1.json")).unwrap(),
    )
    .unwrap();
    let pipeline = pipeline_for("sd1");
    let mut params = params_for(&meta["cases"]["single_euler"]);
    let with = pipeline
        .denoise(
            &params.clone().validate(pipeline.defaults(), &Default::default()).unwrap(),
            &mut NoObserver,
        )
        .unwrap();
    params.controlnets.clear();
    params.width = Some(64);
    params.height = Some(64);
    let without = pipeline
        .denoise(
            &params.validate(pipeline.defaults(), &Default::default()).unwrap(),
            &mut NoObserver,
        )
        .unwrap();
    assert!(max_abs_diff(&with, &without) > 0.1);
}

/// `tiny_edges_single.safetensors` holds tiny_edges under the original LDM names; both
/// load to the same tensors.
#[test]
fn single_file_controlnet_loads_the_folder_weights() {
    let dir = fixtures().join("controlnets/sd1");
    let (config, tensors) = sdserve::models::single_file::load_controlnet(
        &dir.join("tiny_edges_single.safetensors"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let folder: HashMap<String, Tensor> = candle_core::safetensors::load(
        dir.join("tiny_edges/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let folder_config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tiny_edges/config.json")).unwrap())
            .unwrap();
    assert_eq!(config, folder_config);
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut expected: Vec<&String> = folder.keys().collect();
    expected.sort();
    assert_eq!(names, expected);
    for (name, tensor) in &folder {
        let diff = max_abs_diff(&tensor.to_dtype(DType::F32).unwrap(), &tensors[name]);
        assert_eq!(diff, 0.0, "{name}");
    }
    // And it runs: the single file gives the folder's result.
    let library = ControlNetLibrary::new(vec![dir], 4);
    let pipeline = Pipeline::load("fixture", &fixtures().join("sd1"), &LoadOptions::default())
        .unwrap()
        .with_controlnet_library(Arc::new(library));
    let run = |model: &str| {
        let params = GenerationParams {
            prompt: "a cube".into(),
            steps: Some(2),
            seed: Some(3),
            sampler: Some("euler".into()),
            controlnets: vec![ControlNetParams {
                model: model.into(),
                image: image_base64("images/control_edges_64.png"),
                ..Default::default()
            }],
            ..Default::default()
        };
        let request = params.validate(pipeline.defaults(), &Default::default()).unwrap();
        pipeline.denoise(&request, &mut NoObserver).unwrap()
    };
    assert_eq!(max_abs_diff(&run("tiny_edges"), &run("tiny_edges_single")), 0.0);
}

/// Unknown names and ControlNets of another family fail with the field named.
#[test]
fn bad_controlnets_name_their_field() {
    let library = ControlNetLibrary::new(
        vec![fixtures().join("controlnets/sd1"), fixtures().join("controlnets/sdxl")],
        4,
    );
    let pipeline = Pipeline::load("fixture", &fixtures().join("sd1"), &LoadOptions::default())
        .unwrap()
        .with_controlnet_library(Arc::new(library));
    for (model, mentions) in [("nope", "unknown ControlNet"), ("tiny_xl", "another model family")] {
        let params = GenerationParams {
            prompt: "a cube".into(),
            steps: Some(1),
            controlnets: vec![
                ControlNetParams {
                    model: "tiny_edges".into(),
                    image: image_base64("images/control_edges_64.png"),
                    ..Default::default()
                },
                ControlNetParams {
                    model: model.into(),
                    image: image_base64("images/control_edges_64.png"),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let request = params.validate(pipeline.defaults(), &Default::default()).unwrap();
        let error = pipeline.generate(&request, &mut NoObserver).unwrap_err();
        let sdserve::error::PipelineError::Invalid(invalid) = error else {
            panic!("{model}: expected a validation error, got {error}");
        };
        assert_eq!(invalid.field, "controlnets[1].model");
        assert!(invalid.message.contains(mentions), "{invalid}");
    }
}

/// Without its sidecar, a single-file ControlNet whose family cannot be told from its
/// weights (the tiny one has 32-wide cross-attention) is refused with a message that
/// names the sidecar to add.
#[test]
fn single_file_without_a_config_asks_for_a_sidecar() {
    let dir = std::env::temp_dir().join(format!("sdserve-cn-single-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("bare.safetensors");
    std::fs::copy(fixtures().join("controlnets/sd1/tiny_edges_single.safetensors"), &copy).unwrap();
    let error = sdserve::models::loader::load_controlnet(&copy, &Device::Cpu, DType::F32)
        .expect_err("no config can be inferred");
    let message = error.to_string();
    assert!(message.contains("cannot tell the ControlNet's model family"), "{message}");
    assert!(message.contains("bare.config.json"), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// ControlNets combine with img2img (the window counts the steps that run) and with a
/// second-order sampler (its extra model evaluations get residuals too).
#[test]
fn controlnets_run_with_img2img_and_heun() {
    let pipeline = pipeline_for("sd1");
    let unit = |end: f64| ControlNetParams {
        model: "tiny_edges".into(),
        image: image_base64("images/control_edges_64.png"),
        end: Some(end),
        ..Default::default()
    };
    let params = GenerationParams {
        prompt: "a cube".into(),
        steps: Some(4),
        seed: Some(5),
        sampler: Some("heun".into()),
        init_image: Some(image_base64("images/init_64.png")),
        strength: Some(0.5),
        controlnets: vec![unit(0.5)],
        ..Default::default()
    };
    let request = params.clone().validate(pipeline.defaults(), &Default::default()).unwrap();
    let windowed = pipeline.denoise(&request, &mut NoObserver).unwrap();
    let full = GenerationParams { controlnets: vec![unit(1.0)], ..params };
    let request = full.validate(pipeline.defaults(), &Default::default()).unwrap();
    let whole = pipeline.denoise(&request, &mut NoObserver).unwrap();
    assert!(max_abs_diff(&windowed, &whole) > 1e-3, "the window changed nothing");
}
