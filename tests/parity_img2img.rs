//! img2img and inpainting parity with diffusers: the tiny fixture models, the synthetic
//! init image and mask of tests/fixtures/images, seed 42, strength 0.6, 6 steps must give
//! diffusers' final latents (max |Δ| ≤ 1e-3) and image (max |Δ| ≤ 2/255 on RGB8).
//! References: tests/fixtures/reference/img2img_<family>.{json,safetensors}, made by
//! tools/make_img2img_refs.py (StableDiffusion(XL)Img2ImgPipeline and the 4-channel
//! StableDiffusion(XL)InpaintPipeline), and img2img_samplers3_sd1.* (UniPC, PLMS, DDPM,
//! DPM++ 3M SDE, DPM++ SDE with s_noise 0; inpainting with UniPC and PLMS), made by
//! tools/make_sampler3_refs.py. diffusers' inpainting output is not pasted back, so
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
    check_references(&format!("img2img_{family}"), family);
}

/// Runs the cases of tests/fixtures/reference/`{stem}`.{json,safetensors} on the `family`
/// fixture model.
fn check_references(stem: &str, family: &str) {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("reference/{stem}.json"))).unwrap(),
    )
    .unwrap();
    let refs: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join(format!("reference/{stem}.safetensors")),
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
            s_noise: case.get("s_noise").and_then(Value::as_f64),
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

/// Samplers whose `add_noise` came later: UniPC, PLMS (diffusers counts its warm-up from
/// the first step run), DDPM, DPM++ 3M SDE and DPM++ SDE (s_noise 0).
#[test]
fn sd1_img2img_with_later_samplers_matches_diffusers() {
    check_references("img2img_samplers3_sd1", "sd1");
}

#[test]
fn sdxl_img2img_and_inpainting_match_diffusers() {
    check_family("sdxl");
}

/// A 9-channel inpainting UNet (`[latents, mask, masked image latents]`), at strength 0.6
/// and at full strength (pure noise start, no init encoding).
#[test]
fn sd1_nine_channel_inpainting_matches_diffusers() {
    check_family("sd1_inpaint");
}

fn small_request(init: Option<String>, mask: Option<String>) -> GenerationParams {
    GenerationParams {
        prompt: "a cube".into(),
        steps: Some(3),
        seed: Some(1),
        sampler: Some("euler".into()),
        init_image: init,
        mask_image: mask,
        mask_blur: Some(0),
        ..Default::default()
    }
}

/// The 9-channel model needs a mask; text-to-image and plain img2img are refused.
#[test]
fn nine_channel_model_refuses_requests_without_a_mask() {
    let pipeline =
        Pipeline::load("inpaint", &fixtures().join("sd1_inpaint"), &LoadOptions::default())
            .unwrap();
    let init = image_base64("images/init_64.png");
    for params in [small_request(None, None), small_request(Some(init), None)] {
        let request = params.validate(pipeline.defaults(), &Default::default()).unwrap();
        let error = pipeline.generate(&request, &mut NoObserver).unwrap_err().to_string();
        assert!(error.contains("mask_image"), "{error}");
    }
}

/// Paste-back (the default) keeps every pixel outside the unblurred mask exactly.
#[test]
fn paste_back_keeps_the_original_outside_the_mask() {
    let pipeline =
        Pipeline::load("fixture", &fixtures().join("sd1"), &LoadOptions::default()).unwrap();
    let init_png = std::fs::read(fixtures().join("images/init_64.png")).unwrap();
    let init = sdserve::codec::decode_image_bytes(&init_png, 1 << 20).unwrap();
    let mask_png = std::fs::read(fixtures().join("images/mask_64.png")).unwrap();
    let mask = sdserve::codec::decode_image_bytes(&mask_png, 1 << 20).unwrap();
    let params = small_request(Some(base64_encode(&init_png)), Some(base64_encode(&mask_png)));
    let request = params.validate(pipeline.defaults(), &Default::default()).unwrap();
    let image = &pipeline.generate(&request, &mut NoObserver).unwrap()[0];
    let (mut kept, mut changed) = (0, 0);
    for pixel in 0..64 * 64 {
        let range = pixel * 3..pixel * 3 + 3;
        if mask.rgb[pixel * 3] == 0 {
            assert_eq!(image.rgb[range.clone()], init.rgb[range], "pixel {pixel}");
            kept += 1;
        } else if image.rgb[range.clone()] != init.rgb[range] {
            changed += 1;
        }
    }
    assert!(kept > 0 && changed > 0, "kept {kept}, changed {changed}");
}
