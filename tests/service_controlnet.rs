//! ControlNets through the HTTP service, with the tiny sd1 fixture and the tiny
//! ControlNets of tests/fixtures/controlnets/sd1: `GET /v1/adapters` lists them, the
//! native API applies one or two by name, and bad ControlNet fields (unknown or escaping
//! names, malformed, unsupported or oversized images, out-of-range scale and window) get
//! a 422 naming the field.

mod service_support;

use std::path::PathBuf;

use base64::Engine;
use serde_json::{json, Value};
use service_support::{error_body, test_settings, Double, TestServer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn file_base64(relative: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(fixtures().join(relative)).unwrap())
}

fn encoded(image: image::DynamicImage, format: image::ImageFormat) -> String {
    let mut bytes = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut bytes), format).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn sd1_server() -> TestServer {
    let mut settings = test_settings();
    // The fixture ControlNets fit the tiny sd1 fixture, not the bundled shapes model.
    settings.models = vec![sdserve::config::ModelSpec {
        name: "sd1".into(),
        path: fixtures().join("sd1"),
        dtype: Default::default(),
    }];
    settings.default_model = "sd1".into();
    settings.controlnet_dirs = vec![fixtures().join("controlnets/sd1")];
    TestServer::start(settings, Double::None).await
}

#[tokio::test]
async fn controlnets_are_listed_and_applied_by_name() {
    let server = sd1_server().await;
    let list: Value = server.get("/v1/adapters").await.json().await.unwrap();
    let names: Vec<&str> = list["controlnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tiny_depth", "tiny_edges", "tiny_edges_single"]);
    assert!(list["controlnets"][0]["path"].as_str().unwrap().ends_with("tiny_depth"));
    assert_eq!((list["t2i_adapters"].clone(), list["ip_adapters"].clone()), (json!([]), json!([])));

    let base = json!({"prompt": "a red cube", "steps": 2, "seed": 7, "sampler": "euler"});
    let mut plain = base.clone();
    plain["width"] = json!(64);
    plain["height"] = json!(64);
    let plain: Value = server.post_json("/v1/generate", &plain).await.json().await.unwrap();
    let mut controlled = base.clone();
    // No size given: the output takes the control image's (64×64).
    controlled["controlnets"] = json!([
        {"model": "tiny_edges", "image": file_base64("images/control_edges_64.png"), "scale": 0.8},
        {"model": "tiny_depth", "image": format!("data:image/png;base64,{}",
            file_base64("images/control_depth_64.png")), "start": 0.0, "end": 0.5},
    ]);
    controlled["guess_mode"] = json!(true);
    let response = server.post_json("/v1/generate", &controlled).await;
    assert_eq!(response.status(), 200);
    let controlled: Value = response.json().await.unwrap();
    assert_eq!(controlled["parameters"]["width"], 64);
    assert_ne!(plain["images"][0]["data"], controlled["images"][0]["data"]);
    server.stop().await;
}

#[tokio::test]
async fn bad_controlnet_fields_get_a_422_naming_the_field() {
    let server = sd1_server().await;
    let edges = file_base64("images/control_edges_64.png");
    // A GIF header: a real image format, but not one of the accepted PNG, JPEG, WebP.
    let gif =
        base64::engine::general_purpose::STANDARD.encode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;");
    // A 4100×4100 PNG compresses to a few kilobytes: refused before its pixels are decoded.
    let bomb = encoded(
        image::DynamicImage::ImageLuma8(image::GrayImage::new(4100, 4100)),
        image::ImageFormat::Png,
    );
    let unit = |extra: Value| {
        let mut unit = json!({"model": "tiny_edges", "image": edges});
        for (key, value) in extra.as_object().unwrap() {
            unit[key] = value.clone();
        }
        unit
    };
    let cases = [
        (json!([unit(json!({"model": "no_such_controlnet"}))]), "controlnets[0].model"),
        (json!([unit(json!({"model": "../sdxl/tiny_xl"}))]), "controlnets[0].model"),
        (json!([unit(json!({"model": "/etc/passwd"}))]), "controlnets[0].model"),
        (
            json!([unit(json!({})), unit(json!({"image": "%%% not base64"}))]),
            "controlnets[1].image",
        ),
        (
            json!([unit(json!({"image": "data:text/plain;base64,aGVsbG8="}))]),
            "controlnets[0].image",
        ),
        (json!([unit(json!({"image": gif}))]), "controlnets[0].image"),
        (json!([unit(json!({"image": bomb}))]), "controlnets[0].image"),
        (json!([unit(json!({"scale": -1.0}))]), "controlnets[0].scale"),
        (json!([unit(json!({"scale": 50.0}))]), "controlnets[0].scale"),
        (json!([unit(json!({"start": 0.6, "end": 0.4}))]), "controlnets[0].start"),
        (json!([unit(json!({"end": 1.5}))]), "controlnets[0].end"),
        (json!(vec![unit(json!({})); 5]), "controlnets"),
    ];
    for (controlnets, field) in cases {
        let request = json!({"prompt": "x", "steps": 2, "seed": 1, "controlnets": controlnets});
        let error = error_body(server.post_json("/v1/generate", &request).await, 422).await;
        assert_eq!(error["param"], field, "{error}");
    }
    let request = json!({"prompt": "x", "steps": 2, "guess_mode": true});
    let error = error_body(server.post_json("/v1/generate", &request).await, 422).await;
    assert_eq!(error["param"], "guess_mode", "{error}");
    // ControlNet objects refuse unknown fields, as the rest of the request does.
    let request = json!({"prompt": "x", "controlnets": [unit(json!({"weight": 1.0}))]});
    let response = server.post_json("/v1/generate", &request).await;
    assert!(response.status().is_client_error(), "{}", response.status());
    server.stop().await;
}
