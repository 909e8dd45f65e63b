//! IP-Adapters through the native API against the real server with the tiny sd1 fixture
//! and the fixture adapters of tests/fixtures/ip_adapters: base and plus adapters steer
//! the image by name, several images per adapter work, and every bad input (unknown or
//! escaping names, malformed, non-image or oversized images, bad scales, an adapter for
//! another model) is a 422 naming the field.

mod service_support;

use base64::Engine;
use serde_json::{json, Value};
use service_support::{error_body, test_settings, Double, TestServer};

fn fixtures() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
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

async fn sd1_server() -> TestServer {
    let mut settings = test_settings();
    // The fixture adapters were made for the tiny sd1 fixture's UNet.
    settings.models = vec![sdserve::config::ModelSpec {
        name: "sd1".into(),
        path: fixtures().join("sd1"),
        dtype: Default::default(),
    }];
    settings.default_model = "sd1".into();
    settings.ip_adapter_dirs = vec![fixtures().join("ip_adapters")];
    TestServer::start(settings, Double::None).await
}

fn request(ip_adapters: Value) -> Value {
    json!({"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 7,
           "sampler": "euler", "ip_adapters": ip_adapters})
}

fn pixels(body: &Value) -> Vec<u8> {
    let png = base64::engine::general_purpose::STANDARD
        .decode(body["images"][0]["data"].as_str().unwrap())
        .unwrap();
    image::load_from_memory(&png).unwrap().to_rgb8().into_raw()
}

#[tokio::test]
async fn ip_adapters_steer_the_image_by_name() {
    let server = sd1_server().await;
    let image_a = file_base64("images/ip_ref_a.png");
    let image_b = format!("data:image/png;base64,{}", file_base64("images/ip_ref_b.png"));
    let generate = |body: Value| {
        let server = &server;
        async move {
            let response = server.post_json("/v1/generate", &body).await;
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            assert_eq!(status, 200, "{body}");
            pixels(&body)
        }
    };
    let plain = generate(request(json!([]))).await;
    let base = generate(request(json!([{"model": "sd1/ip-adapter_sd1", "image": image_a}]))).await;
    assert_ne!(plain, base, "the base adapter changed nothing");
    let off =
        generate(request(json!([{"model": "sd1/ip-adapter_sd1", "image": image_a, "scale": 0.0}])))
            .await;
    assert_eq!(plain, off, "scale 0 must be the plain image");
    let plus = generate(request(
        json!([{"model": "sd1/ip-adapter-plus_sd1", "images": [image_a, image_b], "scale": 0.7}]),
    ))
    .await;
    assert_ne!(plain, plus, "the plus adapter changed nothing");
    let both = generate(request(json!([
        {"model": "sd1/ip-adapter_sd1", "image": image_a, "scale": 0.5},
        {"model": "sd1/ip-adapter-plus_sd1", "image": image_b, "scale": 0.5}
    ])))
    .await;
    assert_ne!(both, base);

    // The OpenAI dialect takes the same extension field.
    let openai = json!({"prompt": "a red cube", "steps": 2, "size": "64x64", "seed": 7,
        "sampler": "euler", "ip_adapters": [{"model": "sd1/ip-adapter_sd1", "image": image_a}]});
    let response = server.post_json("/v1/images/generations", &openai).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().to_rgb8().into_raw(), base);
    server.stop().await;
}

#[tokio::test]
async fn bad_ip_adapter_input_gets_a_422_naming_the_field() {
    let server = sd1_server().await;
    let good = file_base64("images/ip_ref_a.png");
    // A 4100×4100 PNG compresses to a few kilobytes: refused before its pixels are decoded.
    let bomb = png_base64(image::DynamicImage::ImageLuma8(image::GrayImage::new(4100, 4100)));
    let model = "sd1/ip-adapter_sd1";
    let cases = [
        (json!([{"model": "no_such_adapter", "image": good}]), "ip_adapters[0].model"),
        (json!([{"model": "../sd1/unet/x", "image": good}]), "ip_adapters[0].model"),
        (json!([{"model": "/etc/passwd", "image": good}]), "ip_adapters[0].model"),
        // An adapter for another UNet is refused by the worker, still naming the field.
        (json!([{"model": "sdxl/ip-adapter_sdxl", "image": good}]), "ip_adapters[0].model"),
        (json!([{"model": model, "image": "%%% not base64"}]), "ip_adapters[0].image"),
        (
            json!([{"model": model, "image": "data:text/plain;base64,aGVsbG8="}]),
            "ip_adapters[0].image",
        ),
        (json!([{"model": model, "image": "aGVsbG8gd29ybGQ="}]), "ip_adapters[0].image"),
        (json!([{"model": model, "image": bomb}]), "ip_adapters[0].image"),
        (json!([{"model": model}]), "ip_adapters[0].image"),
        (json!([{"model": model, "image": good, "images": [good]}]), "ip_adapters[0].images"),
        (json!([{"model": model, "images": [good, "???"]}]), "ip_adapters[0].images[1]"),
        (json!([{"model": model, "image": good, "scale": 9.0}]), "ip_adapters[0].scale"),
        (
            json!([{"model": model, "image": good}, {"model": model, "image": good, "scale": -3}]),
            "ip_adapters[1].scale",
        ),
    ];
    for (adapters, field) in cases {
        let error =
            error_body(server.post_json("/v1/generate", &request(adapters)).await, 422).await;
        assert_eq!(error["param"], field, "{error}");
    }
    let too_many: Vec<Value> = (0..5).map(|_| json!({"model": model, "image": good})).collect();
    let error =
        error_body(server.post_json("/v1/generate", &request(json!(too_many))).await, 422).await;
    assert_eq!(error["param"], "ip_adapters", "{error}");
    // Unknown fields inside an adapter are refused too (no silent typos).
    let response = server
        .post_json("/v1/generate", &request(json!([{"model": model, "image": good, "weight": 1}])))
        .await;
    assert_eq!(response.status(), 422);
    server.stop().await;
}
