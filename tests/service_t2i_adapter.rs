//! T2I-Adapters through the native API against the real server: a request with an
//! adapter gives diffusers' image (the tiny SD 1.x fixture and its full adapter, as
//! tests/parity_t2i_adapter.rs checks in-process), and bad adapter fields (malformed,
//! oversized or non-whitelisted images, bad names and scales, adapters that do not fit
//! the model) get a 4xx naming the field.

mod service_support;

use std::path::PathBuf;

use base64::Engine;
use sdserve::config::{ModelSpec, Settings};
use serde_json::{json, Value};
use service_support::{error_body, test_settings, Double, TestServer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn file_base64(relative: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(fixtures().join(relative)).unwrap())
}

fn png_base64(image: image::DynamicImage) -> String {
    let mut png = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(png)
}

/// The tiny SD 1.x fixture with the fixture adapters.
fn settings() -> Settings {
    let mut settings = test_settings();
    settings.models = vec![ModelSpec {
        name: "sd1".into(),
        path: fixtures().join("sd1"),
        dtype: Default::default(),
    }];
    settings.default_model = "sd1".into();
    settings.t2i_adapter_dirs = vec![fixtures().join("t2i_adapters")];
    settings.limits.max_body_bytes = 8 * 1024 * 1024;
    settings
}

#[tokio::test]
async fn an_adapter_request_gives_diffusers_image() {
    let server = TestServer::start(settings(), Double::None).await;
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/t2i_adapter.json")).unwrap(),
    )
    .unwrap();
    let case = &meta["cases"]["sd1_full_euler"];
    let adapter = &case["adapters"][0];
    let request = json!({
        "prompt": case["prompt"], "negative_prompt": case["negative_prompt"],
        "steps": case["steps"], "guidance_scale": case["guidance_scale"],
        "sampler": case["sampler"], "seed": case["seed"],
        "t2i_adapters": [{"model": adapter["model"],
            "image": format!("data:image/png;base64,{}", file_base64(adapter["image"].as_str().unwrap())),
            "scale": adapter["scale"]}],
    });
    let response = server.post_json("/v1/generate", &request).await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["parameters"]["width"].as_u64(), body["parameters"]["height"].as_u64()),
        (Some(64), Some(64)),
        "the control image's size"
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(body["images"][0]["data"].as_str().unwrap())
        .unwrap();
    let actual = image::load_from_memory(&png).unwrap().to_rgb8().into_raw();
    let refs = candle_core::safetensors::load(
        fixtures().join("reference/t2i_adapter.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let expected = refs["sd1_full_euler.image"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let diff = actual.iter().zip(&expected).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(diff <= 2, "image max |Δ| = {diff}/255");
    server.stop().await;
}

#[tokio::test]
async fn bad_adapter_fields_get_a_4xx_naming_the_field() {
    let server = TestServer::start(settings(), Double::None).await;
    let control = file_base64("images/control_rgb_64.png");
    // A 4100×4100 PNG compresses to a few kilobytes: refused before its pixels are decoded.
    let bomb = png_base64(image::DynamicImage::ImageLuma8(image::GrayImage::new(4100, 4100)));
    let gif =
        base64::engine::general_purpose::STANDARD.encode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;");
    let good = json!({"model": "sd1_full", "image": control});
    let cases = [
        (json!([{"model": "sd1_full", "image": "%%% not base64"}]), "t2i_adapters[0].image"),
        (
            json!([{"model": "sd1_full", "image": "data:text/plain;base64,aGVsbG8="}]),
            "t2i_adapters[0].image",
        ),
        (json!([good, {"model": "sd1_full", "image": bomb}]), "t2i_adapters[1].image"),
        (json!([good, {"model": "sd1_full", "image": gif}]), "t2i_adapters[1].image"),
        (json!([{"model": "sd1_full", "image": control, "scale": 11}]), "t2i_adapters[0].scale"),
        (json!([{"model": "sd1_full", "image": control, "scale": -1}]), "t2i_adapters[0].scale"),
        (json!([{"model": "../sd1", "image": control}]), "t2i_adapters[0].model"),
        (json!([{"model": "nope", "image": control}]), "t2i_adapters[0].model"),
        (json!([good, good, good, good, good]), "t2i_adapters"),
        // Found, but an SDXL adapter: its features do not fit SD 1.x's blocks.
        (json!([{"model": "sdxl_full", "image": control}]), "t2i_adapters[0].model"),
    ];
    for (adapters, field) in cases {
        let request = json!({"prompt": "x", "steps": 2, "seed": 1, "t2i_adapters": adapters});
        let error = error_body(server.post_json("/v1/generate", &request).await, 422).await;
        assert_eq!(error["param"], field, "{error}");
    }
    // A missing image is a malformed body.
    let request = json!({"prompt": "x", "t2i_adapters": [{"model": "sd1_full"}]});
    let response = server.post_json("/v1/generate", &request).await;
    assert!(response.status().is_client_error(), "{}", response.status());
    server.stop().await;
}
