//! T2I-Adapter parity with diffusers on the tiny fixture models: random-weight adapters
//! (full and light on SD 1.x, full_adapter_xl on SDXL; one and two at once, several
//! scales) must give diffusers' `StableDiffusionAdapterPipeline` /
//! `StableDiffusionXLAdapterPipeline` final latents (max |Δ| ≤ 1e-3) and images (max |Δ|
//! ≤ 2/255 on RGB8) with the same seed. The UNet's adapter semantics (features added
//! inside attention blocks, after plain blocks and to the mid block) and the adapters'
//! features are checked on their own (max |Δ| ≤ 1e-4).
//! References: tests/fixtures/reference/t2i_adapter.{json,safetensors}, made by
//! tools/make_t2i_adapter_fixtures.py with the adapters in tests/fixtures/t2i_adapters.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sdserve::adapters::t2i::T2IAdapterLibrary;
use sdserve::codec::base64_encode;
use sdserve::models::loader;
use sdserve::models::unet::{AddedConditions, UNetResiduals};
use sdserve::pipeline::t2i_adapter::T2IAdapterParams;
use sdserve::pipeline::{GenerationParams, LoadOptions, NoObserver, Pipeline};
use serde_json::Value;

const LATENT_TOLERANCE: f32 = 1e-3;
const IMAGE_TOLERANCE: u8 = 2;
const COMPONENT_TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn references() -> (Value, HashMap<String, Tensor>) {
    let meta = std::fs::read_to_string(fixtures().join("reference/t2i_adapter.json")).unwrap();
    let refs = candle_core::safetensors::load(
        fixtures().join("reference/t2i_adapter.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    (serde_json::from_str(&meta).unwrap(), refs)
}

fn library() -> Arc<T2IAdapterLibrary> {
    Arc::new(T2IAdapterLibrary::new(vec![fixtures().join("t2i_adapters")]))
}

fn pipeline(family: &str) -> Pipeline {
    Pipeline::load(family, &fixtures().join(family), &LoadOptions::default())
        .unwrap()
        .with_t2i_adapter_library(library())
}

fn image_base64(relative: &str) -> String {
    base64_encode(&std::fs::read(fixtures().join(relative)).unwrap())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn params(case: &Value, adapters: Vec<T2IAdapterParams>) -> GenerationParams {
    GenerationParams {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: Some(case["negative_prompt"].as_str().unwrap().into()),
        width: Some(case["width"].as_u64().unwrap() as u32),
        height: Some(case["height"].as_u64().unwrap() as u32),
        steps: Some(case["steps"].as_u64().unwrap() as u32),
        guidance_scale: case["guidance_scale"].as_f64(),
        sampler: Some(case["sampler"].as_str().unwrap().into()),
        seed: case["seed"].as_i64(),
        n: Some(case["n"].as_u64().unwrap() as u32),
        t2i_adapters: adapters,
        ..Default::default()
    }
}

fn case_adapters(case: &Value) -> Vec<T2IAdapterParams> {
    case["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| T2IAdapterParams {
            model: a["model"].as_str().unwrap().into(),
            image: image_base64(a["image"].as_str().unwrap()),
            scale: a["scale"].as_f64(),
        })
        .collect()
}

fn check_family(family: &str) {
    let (meta, refs) = references();
    let pipeline = pipeline(family);
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, case) in meta["cases"].as_object().unwrap() {
        if case["family"] != family {
            continue;
        }
        let request = params(case, case_adapters(case))
            .validate(pipeline.defaults(), &Default::default())
            .unwrap();
        let latents = pipeline.denoise(&request, &mut NoObserver).unwrap();
        let latent_diff = max_abs_diff(&latents, &refs[&format!("{name}.latents")]);
        let actual: Vec<u8> = pipeline
            .generate(&request, &mut NoObserver)
            .unwrap()
            .into_iter()
            .flat_map(|image| image.rgb)
            .collect();
        let expected = refs[&format!("{name}.image")].to_dtype(DType::U8).unwrap();
        let expected = expected.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(actual.len(), expected.len(), "{name}: image size");
        let image_diff = actual.iter().zip(&expected).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        println!("{name}: latents max |Δ| = {latent_diff:e}, image max |Δ| = {image_diff}/255");
        if latent_diff > LATENT_TOLERANCE || image_diff > IMAGE_TOLERANCE {
            failures.push(format!("{name}: latents {latent_diff}, image {image_diff}"));
        }
        checked += 1;
    }
    assert!(checked >= 3, "{family}: only {checked} cases");
    assert!(failures.is_empty(), "{family}: {failures:?}");
}

#[test]
fn sd1_full_and_light_adapters_match_diffusers() {
    check_family("sd1");
}

#[test]
fn sdxl_full_adapter_xl_matches_diffusers() {
    check_family("sdxl");
}

/// diffusers' UNet with `down_intrablock_additional_residuals`: one feature per down block
/// (inside the attention block of SD 1.x's first block, after the plain blocks: SD 1.x's
/// last block has no downsampler, SDXL's first has one) plus one for the mid block.
#[test]
fn unet_adds_intrablock_features_as_diffusers() {
    let (meta, refs) = references();
    let timestep = meta["unet_timestep"].as_f64().unwrap();
    for family in ["sd1", "sdxl"] {
        let model = loader::load(&fixtures().join(family), &Device::Cpu, DType::F32).unwrap();
        let key = |name: &str| refs[&format!("unet_{family}.{name}")].clone();
        let added = (family == "sdxl").then(|| AddedConditions {
            text_embeds: key("text_embeds"),
            time_ids: key("time_ids"),
        });
        let residuals = UNetResiduals {
            down_intrablock: Some((0..3).map(|i| key(&format!("residual.{i}"))).collect()),
            ..Default::default()
        };
        let output = model
            .unet
            .forward_with_residuals(
                &key("sample"),
                timestep,
                &key("encoder_hidden_states"),
                added.as_ref(),
                &residuals,
            )
            .unwrap();
        let diff = max_abs_diff(&output, &key("output"));
        println!("{family} unet with intrablock residuals: max |Δ| = {diff:e}");
        assert!(diff <= COMPONENT_TOLERANCE, "{family}: {diff}");
    }
}

/// Each adapter's features for its control image (pixels / 255; one-channel adapters
/// read the grayscale image).
#[test]
fn adapter_features_match_diffusers() {
    let (meta, refs) = references();
    let library = library();
    for (name, image) in meta["adapter_images"].as_object().unwrap() {
        let adapter = library.load(name, &Device::Cpu, DType::F32).unwrap();
        let png = std::fs::read(fixtures().join(image.as_str().unwrap())).unwrap();
        let decoded = sdserve::codec::decode_image_bytes(&png, 1 << 20).unwrap();
        let channels = adapter.config().in_channels;
        // The grayscale PNG decodes to equal R, G and B: any one channel is its luma.
        let pixels: Vec<f32> = decoded
            .rgb
            .chunks_exact(3)
            .flat_map(|p| p[..channels].to_vec())
            .map(f32::from)
            .collect();
        let (h, w) = (decoded.height as usize, decoded.width as usize);
        let input = (Tensor::from_vec(pixels, (h, w, channels), &Device::Cpu)
            .unwrap()
            .permute((2, 0, 1))
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            / 255.0)
            .unwrap();
        let features = adapter.forward(&input).unwrap();
        for (i, feature) in features.iter().enumerate() {
            let diff = max_abs_diff(feature, &refs[&format!("adapter_{name}.feature.{i}")]);
            println!("{name} feature {i}: max |Δ| = {diff:e}");
            assert!(diff <= COMPONENT_TOLERANCE, "{name} feature {i}: {diff}");
        }
        assert!(!refs.contains_key(&format!("adapter_{name}.feature.{}", features.len())));
    }
}

fn small(adapters: Vec<T2IAdapterParams>) -> GenerationParams {
    GenerationParams {
        prompt: "a cube".into(),
        steps: Some(2),
        seed: Some(5),
        sampler: Some("euler".into()),
        t2i_adapters: adapters,
        ..Default::default()
    }
}

fn adapter(model: &str, image: &str, scale: f64) -> T2IAdapterParams {
    T2IAdapterParams { model: model.into(), image: image_base64(image), scale: Some(scale) }
}

/// Scale 0 is exactly the run without the adapter; other scales change the result more
/// the larger they are.
#[test]
fn scale_zero_is_no_adapter_and_larger_scales_move_further() {
    let pipeline = pipeline("sd1");
    let run = |adapters| {
        let request = small(adapters).validate(pipeline.defaults(), &Default::default()).unwrap();
        pipeline.denoise(&request, &mut NoObserver).unwrap()
    };
    let plain = run(vec![]);
    let image = "images/control_rgb_64.png";
    assert_eq!(max_abs_diff(&run(vec![adapter("sd1_full", image, 0.0)]), &plain), 0.0);
    let half = max_abs_diff(&run(vec![adapter("sd1_full", image, 0.5)]), &plain);
    let double = max_abs_diff(&run(vec![adapter("sd1_full", image, 2.0)]), &plain);
    println!("latents moved by scale 0.5: {half}, by scale 2: {double}");
    // Far beyond the parity tolerance, so the parity cases do test the adapters.
    assert!(half > 100.0 * LATENT_TOLERANCE && double > half, "{half}, {double}");
}

/// Adapters that do not fit the model or the size are the request's error, naming it.
#[test]
fn misfits_are_errors_naming_the_adapter() {
    let sd1 = pipeline("sd1");
    let gray = "images/control_gray_64.png";
    let cases = [
        (small(vec![adapter("sdxl_full", gray, 1.0)]), "t2i_adapters[0].model", "down block"),
        (
            small(vec![adapter("sd1_full", gray, 1.0), adapter("nope", gray, 1.0)]),
            "t2i_adapters[1].model",
            "unknown",
        ),
    ];
    for (params, field, mentions) in cases {
        let request = params.validate(sd1.defaults(), &Default::default()).unwrap();
        let error = sd1.generate(&request, &mut NoObserver).unwrap_err();
        let sdserve::error::PipelineError::Invalid(error) = error else {
            panic!("expected a validation error, got {error}");
        };
        assert_eq!(error.field, field, "{error}");
        assert!(error.message.contains(mentions), "{error}");
    }
    // full_adapter_xl unshuffles 16×16 cells: 72 pixels do not split.
    let sdxl = pipeline("sdxl");
    let mut params = small(vec![adapter("sdxl_full", gray, 1.0)]);
    params.width = Some(72);
    let request = params.validate(sdxl.defaults(), &Default::default()).unwrap();
    let error = sdxl.generate(&request, &mut NoObserver).unwrap_err().to_string();
    assert!(error.contains("t2i_adapters[0].model") && error.contains("16"), "{error}");
}

/// Without a size the output takes the first control image's (as diffusers does).
#[test]
fn the_first_control_image_sets_the_default_size() {
    let sd1 = pipeline("sd1");
    let wide = image::DynamicImage::ImageRgb8(image::RgbImage::new(100, 70));
    let mut png = Vec::new();
    wide.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let params = small(vec![T2IAdapterParams {
        model: "sd1_full".into(),
        image: base64_encode(&png),
        scale: None,
    }]);
    let request = params.validate(sd1.defaults(), &Default::default()).unwrap();
    assert_eq!((request.width, request.height), (96, 64));
    assert_eq!(request.t2i_adapters[0].image_rgb.len(), 96 * 64 * 3);
    let images = sd1.generate(&request, &mut NoObserver).unwrap();
    assert_eq!((images[0].width, images[0].height), (96, 64));
}
