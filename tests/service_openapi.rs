//! The committed openapi.yaml must equal what the code generates. After changing the API,
//! regenerate it: `cargo run -- print-openapi > openapi.yaml`
//! (or run this test with `SDSERVE_UPDATE_OPENAPI=1`).

#[test]
fn committed_openapi_matches_the_code() {
    let generated = sdserve::api::openapi::openapi_yaml();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    if std::env::var_os("SDSERVE_UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &generated).expect("cannot write openapi.yaml");
    }
    let committed = std::fs::read_to_string(path).expect("openapi.yaml is missing");
    assert!(
        committed == generated,
        "openapi.yaml is out of date: run `cargo run -- print-openapi > openapi.yaml`"
    );
}

#[test]
fn every_route_is_documented() {
    let spec = sdserve::api::openapi::openapi_yaml();
    for route in [
        "/v1/generate:",
        "/v1/jobs:",
        "/v1/jobs/{id}:",
        "/v1/jobs/{id}/events:",
        "/v1/jobs/{id}/images/{index}:",
        "/v1/models:",
        "/v1/samplers:",
        "/health:",
        "/ready:",
        "/metrics:",
        "/openapi.yaml:",
        "/:",
        "/v1/images/generations:",
        "/v1/images/edits:",
        "/sdapi/v1/txt2img:",
        "/sdapi/v1/img2img:",
        "/sdapi/v1/progress:",
        "/sdapi/v1/interrupt:",
        "/sdapi/v1/skip:",
        "/sdapi/v1/samplers:",
        "/sdapi/v1/schedulers:",
        "/sdapi/v1/sd-models:",
        "/sdapi/v1/loras:",
        "/sdapi/v1/embeddings:",
        "/sdapi/v1/options:",
        "/sdapi/v1/png-info:",
    ] {
        assert!(spec.contains(&format!("  {route}\n")), "{route} is not in the OpenAPI document");
    }
    for status in ["'400'", "'401'", "'404'", "'409'", "'410'", "'413'", "'422'", "'429'", "'503'"]
    {
        assert!(spec.contains(status), "no response documents status {status}");
    }
}
