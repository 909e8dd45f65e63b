//! The OpenAI and AUTOMATIC1111 dialects and the playground page, against the real
//! server with the bundled tiny model: the same request through every dialect gives the
//! same image bytes.

mod service_support;

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use service_support::{
    error_body, test_settings, tiny_request, with_api_key, Double, TestServer, PNG_MAGIC,
};

fn b64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(text).expect("valid base64")
}

/// The native API's image for `tiny_request(prompt)` (seed 7, 2 steps, 64×64, Euler a,
/// guidance 7.5).
async fn native_image(server: &TestServer, prompt: &str) -> Vec<u8> {
    let body: Value =
        server.post_json("/v1/generate", &tiny_request(prompt)).await.json().await.unwrap();
    b64(body["images"][0]["data"].as_str().unwrap())
}

/// A multipart/form-data body (files get a file name, as clients send them).
fn multipart_body(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    const BOUNDARY: &str = "sdserve-test-boundary";
    let mut body = Vec::new();
    for (name, bytes) in parts {
        let file =
            if *name == "prompt" { String::new() } else { format!("; filename=\"{name}.png\"") };
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={BOUNDARY}"), body)
}

fn openai_request(prompt: &str) -> Value {
    json!({"prompt": prompt, "model": "dall-e-3", "size": "64x64", "steps": 2, "seed": 7,
           "quality": "standard", "style": "vivid", "user": "tester"})
}

fn a1111_request(prompt: &str) -> Value {
    json!({"prompt": prompt, "steps": 2, "cfg_scale": 7.5, "width": 64, "height": 64,
           "seed": 7, "sampler_name": "Euler a", "scheduler": "Automatic"})
}

#[tokio::test]
async fn openai_images_come_back_as_base64_or_url_and_match_the_native_api() {
    let server = TestServer::start(test_settings(), Double::None).await;
    let native = native_image(&server, "a red cube").await;

    let response = server.post_json("/v1/images/generations", &openai_request("a red cube")).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body["created"].is_u64(), "{body}");
    let image = &body["data"][0];
    assert_eq!(image["revised_prompt"], "a red cube");
    assert!(image.get("url").is_none());
    let bytes = b64(image["b64_json"].as_str().unwrap());
    assert!(bytes.starts_with(PNG_MAGIC));
    assert!(bytes == native, "same request, same seed: same bytes as the native API");

    let mut request = openai_request("a red cube");
    request["response_format"] = json!("url");
    request["n"] = json!(2);
    let body: Value =
        server.post_json("/v1/images/generations", &request).await.json().await.unwrap();
    let urls: Vec<&str> =
        body["data"].as_array().unwrap().iter().map(|d| d["url"].as_str().unwrap()).collect();
    assert_eq!(urls.len(), 2);
    assert!(urls[0].starts_with(&server.base), "{}", urls[0]);
    assert_eq!(body["data"][1]["seed"], 8);
    // The same two images as base64, to compare the downloads with.
    request.as_object_mut().unwrap().remove("response_format");
    let inline: Value =
        server.post_json("/v1/images/generations", &request).await.json().await.unwrap();
    for (index, url) in urls.iter().enumerate() {
        let downloaded = server.client.get(*url).send().await.unwrap();
        assert_eq!(downloaded.status(), 200);
        let expected = b64(inline["data"][index]["b64_json"].as_str().unwrap());
        assert!(downloaded.bytes().await.unwrap() == expected, "image {index} differs");
    }

    // Errors in OpenAI's shape, naming the field.
    for (patch, param, status) in [
        (json!({"size": "huge"}), "size", 422),
        (json!({"size": "65x64"}), "size", 422),
        (json!({"loras": [{"name": "film", "weight": 0.5}]}), "loras", 422),
        (json!({"quality": "ultra"}), "quality", 422),
        (json!({"background": "transparent"}), "background", 422),
        (json!({"stream": true}), "stream", 422),
        (json!({"colour": "red"}), "colour", 422),
        (json!({"model": "no-such-model"}), "model", 404),
    ] {
        let mut request = openai_request("x");
        request.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        let error =
            error_body(server.post_json("/v1/images/generations", &request).await, status).await;
        assert_eq!(error["param"], param, "{error}");
    }
    let mut request = openai_request("x");
    request["loras"] = json!([]);
    assert_eq!(server.post_json("/v1/images/generations", &request).await.status(), 200);
    server.stop().await;
}

/// A 64×64 RGBA PNG, opaque except a transparent square (OpenAI's "edit here").
fn openai_mask() -> Vec<u8> {
    let mask = image::RgbaImage::from_fn(64, 64, |x, y| {
        let edit = (16..48).contains(&x) && (16..48).contains(&y);
        image::Rgba([0, 0, 0, if edit { 0 } else { 255 }])
    });
    let mut png = Vec::new();
    mask.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    png
}

/// The same mask in sdserve's convention: white = repaint.
fn white_mask_base64() -> String {
    let mask = image::GrayImage::from_fn(64, 64, |x, y| {
        image::Luma([if (16..48).contains(&x) && (16..48).contains(&y) { 255 } else { 0 }])
    });
    let mut png = Vec::new();
    mask.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(png)
}

#[tokio::test]
async fn openai_image_edits_inpaint_like_the_native_api() {
    let server = TestServer::start(test_settings(), Double::None).await;
    let png = native_image(&server, "source").await;
    let edit = |parts: &[(&str, &[u8])]| {
        let (content_type, body) = multipart_body(parts);
        server
            .client
            .post(server.url("/v1/images/edits"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let mask = openai_mask();
    let response = edit(&[
        ("prompt", b"a hat"),
        ("image", &png),
        ("mask", &mask),
        ("steps", b"2"),
        ("seed", b"7"),
    ])
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let edited = b64(body["data"][0]["b64_json"].as_str().unwrap());
    assert!(edited.starts_with(PNG_MAGIC));

    // The native request the edit means: white = repaint, strength 1 with a mask.
    let native = json!({"prompt": "a hat", "steps": 2, "seed": 7, "strength": 1.0,
        "init_image": base64::engine::general_purpose::STANDARD.encode(&png),
        "mask_image": white_mask_base64()});
    let body: Value = server.post_json("/v1/generate", &native).await.json().await.unwrap();
    assert_eq!(edited, b64(body["images"][0]["data"].as_str().unwrap()));
    assert_ne!(edited, png, "the masked region was repainted");

    // Without a mask: img2img over the whole image.
    let response = edit(&[("prompt", b"a hat"), ("image", &png), ("steps", b"2")]).await.unwrap();
    assert_eq!(response.status(), 200);

    assert_eq!(error_body(edit(&[("image", &png)]).await.unwrap(), 422).await["param"], "prompt");
    let response = edit(&[("prompt", b"a hat"), ("image", b"not an image")]).await.unwrap();
    assert_eq!(error_body(response, 422).await["param"], "image");
    let response =
        edit(&[("prompt", b"a hat"), ("image", &png), ("mask", b"not an image")]).await.unwrap();
    assert_eq!(error_body(response, 422).await["param"], "mask");
    let response =
        edit(&[("prompt", b"a hat"), ("image", &png), ("strength", b"2")]).await.unwrap();
    assert_eq!(error_body(response, 422).await["param"], "strength");
    let not_multipart = server.post_json("/v1/images/edits", &json!({"prompt": "x"})).await;
    assert_eq!(error_body(not_multipart, 400).await["code"], "invalid_multipart");
    server.stop().await;
}

#[tokio::test]
async fn a1111_txt2img_speaks_a1111_and_matches_the_native_api() {
    let server = TestServer::start(test_settings(), Double::None).await;
    let native = native_image(&server, "a red cube").await;

    // Unknown and unused A1111 fields are accepted.
    let mut request = a1111_request("a red cube");
    for (field, value) in [
        ("enable_hr", json!(false)),
        ("restore_faces", json!(false)),
        ("alwayson_scripts", json!({})),
        ("subseed", json!(-1)),
        ("styles", json!([])),
        ("some_future_field", json!({"a": 1})),
    ] {
        request[field] = value;
    }
    let response = server.post_json("/sdapi/v1/txt2img", &request).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let images = body["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    let png = b64(images[0].as_str().unwrap());
    assert!(png == native, "same request, same seed: same bytes as the native API");
    assert_eq!(body["parameters"]["prompt"], "a red cube");
    assert_eq!(body["parameters"]["n_iter"], 1, "defaults are filled in");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!((info["seed"].as_u64(), info["steps"].as_u64()), (Some(7), Some(2)));
    assert_eq!(info["sampler_name"], "Euler a");
    assert_eq!(info["all_seeds"], json!([7]));

    // png-info reads our own parameters back.
    let read: Value = server
        .post_json("/sdapi/v1/png-info", &json!({"image": images[0]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(read["info"], info["infotexts"][0], "{read}");
    assert_eq!(read["parameters"]["Seed"], "7");
    assert_eq!(read["parameters"]["Prompt"], "a red cube");

    // batch_size × n_iter images with consecutive seeds; legacy sampler alias; clip skip
    // and model through override_settings.
    let mut request = a1111_request("two");
    request["batch_size"] = json!(1);
    request["n_iter"] = json!(2);
    request["sampler_name"] = json!("k_euler_a");
    request.as_object_mut().unwrap().remove("scheduler");
    request["override_settings"] =
        json!({"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "shapes", "eta_ddim": 0});
    let body: Value = server.post_json("/sdapi/v1/txt2img", &request).await.json().await.unwrap();
    assert_eq!(body["images"].as_array().map(Vec::len), Some(2), "{body}");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([7, 8]));
    assert!(info["infotexts"][1].as_str().unwrap().contains("Clip skip: 2"), "{info}");

    // Errors keep OpenAI's shape and add A1111's `detail`.
    for (patch, param, status) in [
        (json!({"sampler_name": "Warp Drive Karras"}), "sampler_name", 422),
        (json!({"scheduler": "Zigzag"}), "scheduler", 422),
        (json!({"steps": 0}), "steps", 422),
        (json!({"batch_size": 5, "n_iter": 5}), "batch_size", 422),
        (json!({"override_settings": {"sd_model_checkpoint": "nope"}}), "sd_model_checkpoint", 404),
    ] {
        let mut request = a1111_request("x");
        request.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        let response = server.post_json("/sdapi/v1/txt2img", &request).await;
        assert_eq!(response.status(), status, "{patch}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["param"], param, "{body}");
        assert_eq!(body["detail"], body["error"]["message"], "{body}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a1111_listings_options_and_img2img() {
    let server = TestServer::start(test_settings(), Double::None).await;
    let samplers: Value = server.get("/sdapi/v1/samplers").await.json().await.unwrap();
    let euler_a = samplers.as_array().unwrap().iter().find(|s| s["name"] == "Euler a").unwrap();
    assert!(euler_a["aliases"].as_array().unwrap().contains(&json!("euler_a")));
    assert!(euler_a["options"].is_object());
    let schedulers: Value = server.get("/sdapi/v1/schedulers").await.json().await.unwrap();
    assert_eq!(schedulers[0]["name"], "automatic");
    let models: Value = server.get("/sdapi/v1/sd-models").await.json().await.unwrap();
    assert_eq!(models[0]["title"], "shapes");
    for field in ["model_name", "hash", "sha256", "filename", "config"] {
        assert!(models[0].get(field).is_some(), "{field}: {models}");
    }
    assert_eq!(server.get("/sdapi/v1/loras").await.json::<Value>().await.unwrap(), json!([]));
    let embeddings: Value = server.get("/sdapi/v1/embeddings").await.json().await.unwrap();
    assert_eq!(embeddings, json!({"loaded": {}, "skipped": {}}));

    let options: Value = server.get("/sdapi/v1/options").await.json().await.unwrap();
    assert_eq!(options["sd_model_checkpoint"], "shapes");
    assert_eq!(options["CLIP_stop_at_last_layers"], 1);
    let set = server
        .post_json(
            "/sdapi/v1/options",
            &json!({"sd_model_checkpoint": "shapes [abc123]", "CLIP_stop_at_last_layers": 2,
                    "show_progressbar": true}),
        )
        .await;
    assert_eq!(set.status(), 200);
    let options: Value = server.get("/sdapi/v1/options").await.json().await.unwrap();
    assert_eq!(options["CLIP_stop_at_last_layers"], 2);
    let unknown =
        server.post_json("/sdapi/v1/options", &json!({"sd_model_checkpoint": "nope"})).await;
    assert_eq!(error_body(unknown, 404).await["code"], "model_not_found");

    let progress: Value = server.get("/sdapi/v1/progress").await.json().await.unwrap();
    assert_eq!(
        (progress["progress"].as_f64(), progress["state"]["job_count"].as_u64()),
        (Some(0.0), Some(0))
    );
    assert!(progress["current_image"].is_null());

    let error =
        error_body(server.post_json("/sdapi/v1/img2img", &json!({"prompt": "x"})).await, 422).await;
    assert_eq!(error["param"], "init_images");
    let png = native_image(&server, "source").await;
    let init = base64::engine::general_purpose::STANDARD.encode(&png);
    let mask = white_mask_base64();
    // CLIP_stop_at_last_layers was set to 2 above.
    let request = json!({"prompt": "x", "init_images": [init], "mask": mask, "steps": 2,
        "seed": 7, "denoising_strength": 0.5, "mask_blur": 2, "resize_mode": 1,
        "inpainting_fill": 1, "inpaint_full_res": false, "sampler_name": "Euler",
        "cfg_scale": 7.5});
    let response = server.post_json("/sdapi/v1/img2img", &request).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let from_a1111 = b64(body["images"][0].as_str().unwrap());
    assert!(body["parameters"].get("init_images").is_none(), "images are not echoed");
    let native = json!({"prompt": "x", "init_image": init, "mask_image": mask, "steps": 2,
        "seed": 7, "strength": 0.5, "mask_blur": 2, "resize_mode": "crop", "sampler": "euler",
        "clip_skip": 2});
    let body: Value = server.post_json("/v1/generate", &native).await.json().await.unwrap();
    assert_eq!(from_a1111, b64(body["images"][0]["data"].as_str().unwrap()));

    let bad = json!({"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"]});
    let error = error_body(server.post_json("/sdapi/v1/img2img", &bad).await, 422).await;
    assert_eq!(error["param"], "init_images");
    let bad = json!({"prompt": "x", "init_images": [init], "resize_mode": 3});
    let error = error_body(server.post_json("/sdapi/v1/img2img", &bad).await, 422).await;
    assert_eq!(error["param"], "resize_mode");
    server.stop().await;
}

/// img2img runs int(steps × strength) steps; A1111's progress counts those, not `steps`.
#[tokio::test]
async fn a1111_progress_counts_the_steps_img2img_runs() {
    let server =
        TestServer::start(test_settings(), Double::SlowSteps(Duration::from_millis(100))).await;
    let init = base64::engine::general_purpose::STANDARD.encode(native_image(&server, "x").await);
    let mut request = a1111_request("slow");
    request["steps"] = json!(40);
    request["denoising_strength"] = json!(0.3);
    request["init_images"] = json!([init]);
    let client = server.client.clone();
    let url = server.url("/sdapi/v1/img2img");
    let pending = tokio::spawn(async move { client.post(url).json(&request).send().await });
    let deadline = Instant::now() + Duration::from_secs(60);
    let progress = loop {
        let progress: Value = server.get("/sdapi/v1/progress").await.json().await.unwrap();
        if progress["state"]["sampling_step"].as_u64() >= Some(1) {
            break progress;
        }
        assert!(Instant::now() < deadline, "no progress: {progress}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(progress["state"]["sampling_steps"], 12, "{progress}");
    assert_eq!(server.post_json("/sdapi/v1/interrupt", &json!({})).await.status(), 200);
    let response = pending.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn a1111_progress_follows_a_job_and_interrupt_stops_it() {
    let server =
        TestServer::start(test_settings(), Double::SlowSteps(Duration::from_millis(150))).await;
    let mut request = a1111_request("slow");
    request["steps"] = json!(40);
    let client = server.client.clone();
    let url = server.url("/sdapi/v1/txt2img");
    let pending = tokio::spawn(async move { client.post(url).json(&request).send().await });

    let deadline = Instant::now() + Duration::from_secs(60);
    let progress = loop {
        let progress: Value = server.get("/sdapi/v1/progress").await.json().await.unwrap();
        if progress["state"]["sampling_step"].as_u64() >= Some(1) {
            break progress;
        }
        assert!(Instant::now() < deadline, "no progress: {progress}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let fraction = progress["progress"].as_f64().unwrap();
    assert!(fraction > 0.0 && fraction < 1.0, "{progress}");
    assert_eq!(progress["state"]["sampling_steps"], 40);
    assert_eq!(progress["state"]["job_count"], 1);
    assert!(progress["eta_relative"].as_f64().unwrap() > 0.0, "{progress}");

    let started = Instant::now();
    assert_eq!(server.post_json("/sdapi/v1/interrupt", &json!({})).await.status(), 200);
    let response = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the interrupted request answers within a step or two")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["images"], json!([]));
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
    let progress: Value = server.get("/sdapi/v1/progress").await.json().await.unwrap();
    assert_eq!(progress["state"]["job_count"], 0);
    assert_eq!(progress["state"]["interrupted"], true);
    server.stop().await;
}

#[tokio::test]
async fn the_playground_page_is_served_without_an_api_key() {
    let server = TestServer::start(with_api_key(test_settings(), "sesame"), Double::None).await;
    for path in ["/", "/playground"] {
        let response = server.get(path).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
        let page = response.text().await.unwrap();
        for needle in ["<title>sdserve playground</title>", "/v1/jobs", "/events", "/v1/samplers"] {
            assert!(page.contains(needle), "the page lacks {needle}");
        }
        assert!(!page.contains("http://") && !page.contains("https://"), "no external resources");
    }
    error_body(server.get("/v1/models").await, 401).await;
    error_body(server.get("/sdapi/v1/options").await, 401).await;
    // A1111 clients' --api-auth style: basic auth with the key as the password.
    let basic =
        server.client.get(server.url("/sdapi/v1/options")).basic_auth("webui", Some("sesame"));
    assert_eq!(basic.send().await.unwrap().status(), 200);
    let wrong = server.client.get(server.url("/sdapi/v1/options")).basic_auth("webui", Some("x"));
    error_body(wrong.send().await.unwrap(), 401).await;
    server.stop().await;
}
