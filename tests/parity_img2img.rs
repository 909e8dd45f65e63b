//! img2img and inpainting parity with diffusers: the tiny fixture models, the synthetic
//! init image and mask of tests/fixtures/images, seed 42, strength 0.6, 6 steps must give
//! diffusers' final latents (max |Δ| ≤ 1e-3) and image (max |Δ| ≤ 2/255 on RGB8).
//! References: tests/fixtures/reference/img2img_<family>.{json,safetensors}, made by
//! tools/make_img2img_refs.py (StableDiffusion(XL)Img2ImgPipeline and the 4-channel
//! StableDiffusionInpaintPipeline). diffusers' inpainting output is not pasted back, so
//! inpainting cases run with `paste_back` off and `mask_blur` 0: the comparison covers the
//! latent blending and the decoded image before paste-back.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdserve::codec::base64_encode;
use sdserve::pipeline::{GenerationParams, LoadOptions, NoObserver, Pipeline};
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

fn check_family(family: &str) {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("reference/img2img_{family}.json")))
            .unwrap(),
    )
    .unwrap();
    let refs: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join(format!("reference/img2img_{family}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let pipeline =
        Pipeline::load("fixture", &fixtures().join(family), &LoadOptions::default()).unwrap();
    let init = image_base64(meta["init_image"].as_str().unwrap());
    let mask = image_base64(meta["mask_image"].as_str().unwrap());
    let mut failures = Vec::new();
    for (name, case) in meta["cases"].as_object().unwrap() {
        let inpaint = case["kind"] == "inpaint";
        let params = GenerationParams {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: Some(case["negative_prompt"].as_str().unwrap().into()),
            steps: Some(case["steps"].as_u64().unwrap() as u32),
            guidance_scale: case["guidance_scale"].as_f64(),
            sampler: Some(case["sampler"].as_str().unwrap().into()),
            seed: case["seed"].as_i64(),
            init_image: Some(init.clone()),
            strength: case["strength"].as_f64(),
            mask_image: inpaint.then(|| mask.clone()),
            mask_blur: Some(0),
            paste_back: Some(false),
            ..Default::default()
        };
        let request = params.validate(pipeline.defaults(), &Default::default()).unwrap();
        assert_eq!((request.width, request.height), (64, 64), "size from the init image");
        let latents = pipeline.denoise(&request, &mut NoObserver).unwrap();
        let latent_diff = max_abs_diff(&latents, &refs[&format!("{name}.latents")]);
        let actual = pipeline.generate(&request, &mut NoObserver).unwrap()[0].rgb.clone();
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
fn sd1_img2img_and_inpainting_match_diffusers() {
    check_family("sd1");
}

#[test]
fn sdxl_img2img_matches_diffusers() {
    check_family("sdxl");
}
