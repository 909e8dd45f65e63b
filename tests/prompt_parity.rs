//! A1111 prompt syntax and textual inversion against references made by
//! tools/make_prompt_fixtures.py: text conditioning (weights, BREAK, 75-token chunks with
//! comma backtrack, embeddings) against a re-implementation of A1111's prompt handling over
//! transformers' CLIP (max |Δ| ≤ 1e-4), and whole images with an embedding against
//! diffusers' `load_textual_inversion` (image max |Δ| ≤ 2/255, latents ≤ 1e-3).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sdserve::adapters::embeddings::EmbeddingLibrary;
use sdserve::pipeline::{GenerationParams, LoadOptions, NoObserver, Pipeline, PromptContext};
use serde_json::Value;

const TEXT_TOLERANCE: f32 = 1e-4;
const LATENT_TOLERANCE: f32 = 1e-3;
const IMAGE_TOLERANCE: f32 = 2.0;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn load(family: &str) -> Pipeline {
    Pipeline::load("fixture", &fixtures().join(family), &LoadOptions::default()).unwrap()
}

fn context(family: &str) -> PromptContext {
    let library = EmbeddingLibrary::new(&[fixtures().join("embeddings").join(family)]).unwrap();
    PromptContext::with_embeddings(Arc::new(library))
}

fn check_text(family: &str) {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("reference/prompts_{family}.json")))
            .unwrap(),
    )
    .unwrap();
    let refs = candle_core::safetensors::load(
        fixtures().join(format!("reference/prompts_{family}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let pipeline = load(family);
    let context = context(family);
    for (name, prompt) in meta["prompts"].as_object().unwrap() {
        let prompt = prompt.as_str().unwrap();
        let encoded = pipeline.encode_prompt(prompt, 1, &context, "prompt").unwrap();
        let diff = max_abs_diff(&encoded.context, &refs[&format!("{name}.context")]);
        eprintln!("{family}/{name}: context {:?} max |Δ| {diff:.2e}", encoded.context.dims());
        assert!(diff <= TEXT_TOLERANCE, "{family}/{name}: context differs by {diff}");
        if let Some(expected) = refs.get(&format!("{name}.pooled")) {
            let diff = max_abs_diff(encoded.pooled.as_ref().unwrap(), expected);
            assert!(diff <= TEXT_TOLERANCE, "{family}/{name}: pooled differs by {diff}");
        }
    }
}

#[test]
fn sd1_prompt_syntax_matches_a1111_reference() {
    check_text("sd1");
}

#[test]
fn sdxl_prompt_syntax_matches_a1111_reference() {
    check_text("sdxl");
}

/// A plain prompt under 75 tokens encodes exactly as before (diffusers' literal path).
#[test]
fn plain_prompts_are_bit_identical_to_literal_encoding() {
    for family in ["sd1", "sdxl", "sd2v"] {
        let pipeline = load(family);
        for prompt in ["a photo of an astronaut riding a horse", "", "blurry, low quality"] {
            for clip_skip in [1, 2] {
                let literal = pipeline.encode_literal(prompt, clip_skip).unwrap();
                let parsed = pipeline
                    .encode_prompt(prompt, clip_skip, &PromptContext::default(), "prompt")
                    .unwrap();
                assert_eq!(max_abs_diff(&literal.context, &parsed.context), 0.0, "{family}");
                if let (Some(a), Some(b)) = (&literal.pooled, &parsed.pooled) {
                    assert_eq!(max_abs_diff(a, b), 0.0, "{family}");
                }
            }
        }
    }
}

fn check_image(family: &str) {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("reference/embeddings_{family}.json")))
            .unwrap(),
    )
    .unwrap();
    let refs = candle_core::safetensors::load(
        fixtures().join(format!("reference/embeddings_{family}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let case = &meta["case"];
    let pipeline = load(family);
    let params = GenerationParams {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: Some(case["negative_prompt"].as_str().unwrap().into()),
        width: Some(case["width"].as_u64().unwrap() as u32),
        height: Some(case["height"].as_u64().unwrap() as u32),
        steps: Some(case["steps"].as_u64().unwrap() as u32),
        guidance_scale: case["guidance_scale"].as_f64(),
        sampler: Some(case["sampler"].as_str().unwrap().into()),
        seed: case["seed"].as_i64(),
        ..Default::default()
    };
    let request = params.validate(pipeline.defaults(), &Default::default()).unwrap();
    let context = context(family);
    let latents = pipeline.denoise_with(&request, &context, &mut NoObserver).unwrap();
    let latent_diff = max_abs_diff(&latents, &refs["latents"]);
    let images = pipeline.generate_with(&request, &context, &mut NoObserver).unwrap();
    let ours = Tensor::from_vec(images[0].rgb.clone(), refs["image"].dims(), &Device::Cpu).unwrap();
    let image_diff = max_abs_diff(&ours, &refs["image"]);
    eprintln!("{family}: embedding latents max |Δ| {latent_diff:.2e}, image {image_diff}");
    assert!(latent_diff <= LATENT_TOLERANCE, "{family}: latents differ by {latent_diff}");
    assert!(image_diff <= IMAGE_TOLERANCE, "{family}: image differs by {image_diff}");
    // Without the embedding the same words are plain text, and the image differs.
    let plain =
        pipeline.generate_with(&request, &PromptContext::default(), &mut NoObserver).unwrap();
    let plain = Tensor::from_vec(plain[0].rgb.clone(), refs["image"].dims(), &Device::Cpu).unwrap();
    assert!(
        max_abs_diff(&plain, &refs["image"]) > IMAGE_TOLERANCE,
        "{family}: embedding had no effect"
    );
}

#[test]
fn sd1_textual_inversion_matches_diffusers() {
    check_image("sd1");
}

#[test]
fn sdxl_textual_inversion_matches_diffusers() {
    check_image("sdxl");
}

/// A long prompt with a short negative prompt (different chunk counts) generates, and the
/// SDXL embedding on an SD 1.x model is a clear error naming it.
#[test]
fn mismatched_chunks_and_wrong_embeddings() {
    let pipeline = load("sd1");
    let long = ["castle"; 100].join(" ");
    for (prompt, negative) in [(long.as_str(), "fog"), ("fog", long.as_str())] {
        let params = GenerationParams {
            prompt: prompt.into(),
            negative_prompt: Some(negative.into()),
            steps: Some(2),
            seed: Some(1),
            ..Default::default()
        };
        let request = params.validate(pipeline.defaults(), &Default::default()).unwrap();
        let images = pipeline.generate(&request, &mut NoObserver).unwrap();
        assert_eq!(images.len(), 1);
    }
    let error = pipeline
        .encode_prompt("a tinyxl cat", 1, &context("sdxl"), "negative_prompt")
        .unwrap_err()
        .to_string();
    assert!(error.contains("negative_prompt") && error.contains("tinyxl"), "{error}");
}
