//! The service's endpoints and error cases, against the real server with the bundled
//! tiny model (models/shapes).

mod service_support;

use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use service_support::{
    error_body, test_settings, tiny_request, with_api_key, Double, TestServer, PNG_MAGIC,
};

#[tokio::test]
async fn sync_generate_returns_json_or_image_bytes() {
    let server = TestServer::start(test_settings(), Double::None).await;

    let response = server.post_json("/v1/generate", &tiny_request("a red cube")).await;
    assert_eq!(response.status(), 200);
    for header in ["x-queue-time", "x-inference-time", "x-request-id"] {
        assert!(response.headers().contains_key(header), "missing {header}");
    }
    let body: Value = response.json().await.unwrap();
    assert!(body["id"].is_string());
    let image = &body["images"][0];
    assert_eq!((image["index"].as_u64(), image["seed"].as_u64()), (Some(0), Some(7)));
    assert_eq!(image["format"], "png");
    let png =
        base64::engine::general_purpose::STANDARD.decode(image["data"].as_str().unwrap()).unwrap();
    assert!(png.starts_with(PNG_MAGIC));
    let parameters = &body["parameters"];
    for (field, value) in [
        ("width", json!(64)),
        ("height", json!(64)),
        ("steps", json!(2)),
        ("seed", json!(7)),
        ("n", json!(1)),
        ("sampler", json!("euler_a")),
        ("guidance_scale", json!(7.5)),
        ("negative_prompt", json!("")),
        ("output_format", json!("png")),
        ("priority", json!(0)),
    ] {
        assert_eq!(parameters[field], value, "parameters.{field} in {parameters}");
    }
    assert!(parameters["model"].is_string() && parameters["original_size"].is_array());
    assert!(body["timings"]["queue_ms"].is_u64() && body["timings"]["inference_ms"].is_u64());

    // Accept: image/png returns the bytes themselves.
    let response = server
        .client
        .post(server.url("/v1/generate"))
        .header("accept", "image/png")
        .json(&tiny_request("a red cube"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    assert_eq!(response.headers()["x-seed"], "7");
    let bytes = response.bytes().await.unwrap();
    assert!(bytes.starts_with(PNG_MAGIC));
    assert_eq!(&bytes[..], &png[..], "same seed, same settings: same image");

    // A random seed is reported; JPEG on request.
    let mut body = tiny_request("a red cube");
    body["seed"] = json!(-1);
    body["output_format"] = json!("jpeg");
    let response: Value = server.post_json("/v1/generate", &body).await.json().await.unwrap();
    assert!(response["parameters"]["seed"].is_u64());
    assert_eq!(response["images"][0]["format"], "jpeg");
    server.stop().await;
}

#[tokio::test]
async fn listing_and_operational_endpoints() {
    let server = TestServer::start(test_settings(), Double::None).await;

    let models: Value = server.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["object"], "list");
    let model = &models["data"][0];
    assert_eq!(model["object"], "model");
    assert_eq!(model["family"], "sd1");
    assert_eq!((model["loaded"].as_bool(), model["default"].as_bool()), (Some(true), Some(true)));

    let samplers: Value = server.get("/v1/samplers").await.json().await.unwrap();
    let ids: Vec<&str> =
        samplers["data"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"euler_a"), "{samplers}");
    for id in ["dpmpp_sde", "dpmpp_2s_a", "dpmpp_3m_sde", "deis", "lcm", "tcd"] {
        assert!(ids.contains(&id), "{id}: {samplers}");
    }
    assert_eq!(ids.len(), sdserve::samplers::SamplerKind::ALL.len());
    assert!(
        samplers["data"][0]["display_name"].is_string()
            && samplers["data"][0]["aliases"].is_array()
    );

    assert_eq!(server.get("/health").await.status(), 200);
    let ready: Value = server.get("/ready").await.json().await.unwrap();
    assert_eq!(ready["status"], "ready");

    let spec = server.get("/openapi.yaml").await.text().await.unwrap();
    assert_eq!(spec, sdserve::api::openapi::openapi_yaml());

    server.post_json("/v1/generate", &tiny_request("metrics")).await;
    let metrics = server.get("/metrics").await.text().await.unwrap();
    for name in [
        "sdserve_jobs_total{state=\"succeeded\"} 1",
        "sdserve_queue_depth 0",
        "sdserve_job_queue_seconds_count 1",
        "sdserve_job_inference_seconds_count 1",
        "sdserve_step_seconds_count",
        "sdserve_images_total 1",
        "sdserve_http_requests_total{method=\"POST\",route=\"/v1/generate\",status=\"200\"} 1",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    server.stop().await;
}

#[tokio::test]
async fn every_error_case_has_its_status_and_body() {
    let mut settings = test_settings();
    settings.result_retention_secs = 1;
    settings.limits.max_body_bytes = 4096;
    let server = TestServer::start(settings, Double::None).await;

    // 400: malformed JSON.
    let response =
        server.client.post(server.url("/v1/jobs")).body("{not json").send().await.unwrap();
    assert_eq!(error_body(response, 400).await["code"], "invalid_json");

    // 422: bad values name their field; unknown fields and samplers are errors.
    for (patch, param) in [
        (json!({"steps": 0}), "steps"),
        (json!({"width": 65}), "width"),
        (json!({"stpes": 3}), "stpes"),
        (json!({"steps": "many"}), "steps"),
        (json!({"output_format": "gif"}), "output_format"),
        (json!({"sampler": "warp_drive"}), "sampler"),
        (json!({"timestep_spacing": "sideways"}), "timestep_spacing"),
        (json!({"prediction_type": "flow"}), "prediction_type"),
        (json!({"rescale_betas_zero_snr": "yes"}), "rescale_betas_zero_snr"),
    ] {
        let mut body = tiny_request("x");
        body.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        let error = error_body(server.post_json("/v1/jobs", &body).await, 422).await;
        assert_eq!(error["param"], param, "{error}");
        if param == "sampler" {
            let message = error["message"].as_str().unwrap();
            assert!(
                ["euler_a", "lcm"].iter().all(|id| message.contains(id)),
                "lists valid samplers: {error}"
            );
        }
    }
    let error = error_body(server.post_json("/v1/jobs", &json!({"steps": 2})).await, 422).await;
    assert_eq!(error["param"], "prompt");

    // 404: unknown job, unknown model (listing the valid ones), unknown route.
    let error = error_body(server.get("/v1/jobs/nope").await, 404).await;
    assert_eq!(error["code"], "job_not_found");
    let mut body = tiny_request("x");
    body["model"] = json!("no-such-model");
    let error = error_body(server.post_json("/v1/generate", &body).await, 404).await;
    assert_eq!(error["param"], "model");
    assert!(error["message"].as_str().unwrap().contains("shapes"), "{error}");
    error_body(server.get("/v2/nothing").await, 404).await;

    // 413: body too large.
    let big = json!({ "prompt": "x".repeat(10_000) });
    let error = error_body(server.post_json("/v1/jobs", &big).await, 413).await;
    assert_eq!(error["code"], "body_too_large");

    // 409: cancelling a finished job; 410 once its result expired.
    let id = server.submit(&tiny_request("x")).await;
    let job = server.wait_finished(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let error = error_body(server.delete(&format!("/v1/jobs/{id}")).await, 409).await;
    assert_eq!(error["code"], "job_finished");
    let image = server.get(&format!("/v1/jobs/{id}/images/0")).await;
    assert_eq!(image.status(), 200);
    assert!(image.bytes().await.unwrap().starts_with(PNG_MAGIC));
    error_body(server.get(&format!("/v1/jobs/{id}/images/3")).await, 404).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let error = error_body(server.get(&format!("/v1/jobs/{id}")).await, 410).await;
    assert_eq!(error["code"], "result_expired");
    server.stop().await;
}

#[tokio::test]
async fn api_keys_guard_everything_but_health() {
    let server = TestServer::start(with_api_key(test_settings(), "sesame"), Double::None).await;
    assert_eq!(server.get("/health").await.status(), 200);
    let error = error_body(server.get("/v1/models").await, 401).await;
    assert_eq!(error["type"], "authentication_error");
    let wrong =
        server.client.get(server.url("/v1/models")).bearer_auth("open").send().await.unwrap();
    error_body(wrong, 401).await;
    let right =
        server.client.get(server.url("/v1/models")).bearer_auth("sesame").send().await.unwrap();
    assert_eq!(right.status(), 200);
    let header = server
        .client
        .get(server.url("/v1/samplers"))
        .header("x-api-key", "sesame")
        .send()
        .await
        .unwrap();
    assert_eq!(header.status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn embeddings_are_listed_without_paths() {
    let mut settings = test_settings();
    settings.embeddings_dirs = vec![
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embeddings/sd1")
    ];
    let server = TestServer::start(settings, Double::None).await;
    let list: Value = server.get("/v1/embeddings").await.json().await.unwrap();
    assert_eq!(list["object"], "list");
    let card = &list["data"][0];
    assert_eq!(card["name"], "tinyemb");
    assert_eq!((card["format"].as_str(), card["vectors"].as_u64()), (Some("a1111"), Some(2)));
    assert_eq!(card["width"], 32);
    assert_eq!(card["metadata"]["made_by"], "tools/make_prompt_fixtures.py");
    assert!(!list.to_string().contains("tests/fixtures"), "no paths in {list}");
    server.stop().await;

    // No directories configured: an empty list.
    let server = TestServer::start(test_settings(), Double::None).await;
    let list: Value = server.get("/v1/embeddings").await.json().await.unwrap();
    assert_eq!(list["data"], json!([]));
    server.stop().await;
}

/// The server's workers encode prompts with the configured embeddings: the embedding's
/// name in a prompt changes the image only when its directory is configured.
#[tokio::test]
async fn the_server_uses_its_embeddings_in_prompts() {
    let fixtures = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let settings_for = |embeddings: bool| {
        let mut settings = test_settings();
        settings.models = vec![sdserve::config::ModelSpec {
            name: "sd1".into(),
            path: fixtures.join("sd1"),
            dtype: Default::default(),
        }];
        settings.default_model = "sd1".into();
        if embeddings {
            settings.embeddings_dirs = vec![fixtures.join("embeddings/sd1")];
        }
        settings
    };
    let mut pixels = Vec::new();
    for embeddings in [false, true] {
        let server = TestServer::start(settings_for(embeddings), Double::None).await;
        let response = server.post_json("/v1/generate", &tiny_request("a photo of tinyemb")).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        pixels.push(body["images"][0]["data"].as_str().unwrap().to_string());
        server.stop().await;
    }
    assert_ne!(pixels[0], pixels[1], "the embedding did not reach the server's prompts");
}

/// LoRAs from a configured directory: listed with their metadata, applied by name (native
/// and OpenAI dialects, and the prompt tag), unknown names and traversal refused by field.
#[tokio::test]
async fn loras_are_listed_applied_and_confined_to_their_directory() {
    let mut settings = test_settings();
    // The fixture LoRAs were made for the tiny sd1 fixture, not the bundled shapes model.
    let fixtures = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    settings.models = vec![sdserve::config::ModelSpec {
        name: "sd1".into(),
        path: fixtures.join("sd1"),
        dtype: Default::default(),
    }];
    settings.default_model = "sd1".into();
    settings.lora_dirs =
        vec![std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loras")];
    let server = TestServer::start(settings, Double::None).await;

    let list: Value = server.get("/v1/loras").await.json().await.unwrap();
    let names: Vec<&str> =
        list["data"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"sd1_kohya"), "{names:?}");
    let a1111: Value = server.get("/sdapi/v1/loras").await.json().await.unwrap();
    assert!(a1111.as_array().unwrap().iter().any(|l| l["name"] == "sd1_kohya"));

    let plain = server.post_json("/v1/generate", &tiny_request("a red cube")).await;
    let plain: Value = plain.json().await.unwrap();
    let mut with_lora = tiny_request("a red cube");
    with_lora["loras"] = json!([{"name": "sd1_kohya", "weight": 1.0}]);
    let response = server.post_json("/v1/generate", &with_lora).await;
    assert_eq!(response.status(), 200);
    let lora: Value = response.json().await.unwrap();
    assert_ne!(plain["images"][0]["data"], lora["images"][0]["data"], "the LoRA changed nothing");

    let tagged =
        server.post_json("/v1/generate", &tiny_request("a red cube <lora:sd1_kohya:1>")).await;
    let tagged: Value = tagged.json().await.unwrap();
    // The PNG parameters text differs (it carries the prompt); compare the pixels.
    let pixels = |b64: &Value| {
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
        image::load_from_memory(&png).unwrap().to_rgb8().into_raw()
    };
    assert_eq!(
        pixels(&tagged["images"][0]["data"]),
        pixels(&lora["images"][0]["data"]),
        "tag and field differ"
    );

    let openai = json!({"prompt": "a red cube", "steps": 2, "size": "64x64", "seed": 7,
        "loras": [{"name": "sd1_kohya", "weight": 1.0}]});
    let response = server.post_json("/v1/images/generations", &openai).await;
    assert_eq!(response.status(), 200);
    let openai: Value = response.json().await.unwrap();
    assert_eq!(pixels(&openai["data"][0]["b64_json"]), pixels(&lora["images"][0]["data"]));

    for name in ["no_such_lora", "../loras/sd1_kohya", "/etc/passwd"] {
        let mut request = tiny_request("x");
        request["loras"] = json!([{"name": name}]);
        let response = server.post_json("/v1/generate", &request).await;
        let body = error_body(response, 422).await;
        assert_eq!(body["param"], "loras", "{name}: {body}");
    }
}
