//! Bad model paths and files give errors that name the problem, never a panic.

use std::path::PathBuf;

use sdserve::error::ModelError;
use sdserve::pipeline::{probe, LoadOptions, Pipeline};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load_error(path: &std::path::Path) -> ModelError {
    match Pipeline::load("broken", path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(error) => error,
    }
}

/// Copies a fixture folder (following symlinks) so a test can break a copy of it.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn missing_model_folder_is_named() {
    let error = load_error(&fixtures().join("no-such-model"));
    assert!(matches!(error, ModelError::NotFound(_)), "{error}");
    assert!(error.to_string().contains("no-such-model"), "{error}");
    assert!(probe("x", &fixtures().join("no-such-model")).is_err());
}

#[test]
fn pickle_checkpoints_are_refused_with_the_reason() {
    let dir = tempdir("pickle");
    let path = dir.join("model.ckpt");
    std::fs::write(&path, b"\x80\x02not really a pickle").unwrap();
    let error = load_error(&path);
    assert!(matches!(error, ModelError::PickleRefused(_)), "{error}");
    assert!(error.to_string().contains("arbitrary code"), "{error}");
}

#[test]
fn a_folder_without_model_index_is_an_unknown_layout() {
    let error = load_error(&fixtures().join("sd1/unet"));
    assert!(matches!(error, ModelError::UnknownLayout { .. }), "{error}");
    assert!(error.to_string().contains("model_index.json"), "{error}");
}

#[test]
fn a_truncated_component_file_is_reported() {
    let dir = tempdir("truncated");
    copy_dir(&fixtures().join("sd1"), &dir);
    let weights = dir.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let error = load_error(&dir);
    assert!(matches!(error, ModelError::InvalidSafetensors { .. }), "{error}");
    assert!(error.to_string().contains("diffusion_pytorch_model.safetensors"), "{error}");
}

#[test]
fn a_component_saved_only_as_pickle_is_refused() {
    let dir = tempdir("bin-only");
    copy_dir(&fixtures().join("sd1"), &dir);
    let vae = dir.join("vae");
    std::fs::rename(
        vae.join("diffusion_pytorch_model.safetensors"),
        vae.join("diffusion_pytorch_model.bin"),
    )
    .unwrap();
    let error = load_error(&dir);
    assert!(matches!(error, ModelError::PickleRefused(_)), "{error}");
}

#[test]
fn a_config_that_does_not_fit_the_weights_is_reported() {
    let dir = tempdir("bad-config");
    copy_dir(&fixtures().join("sd1"), &dir);
    let config_path = dir.join("unet/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["block_out_channels"] = serde_json::json!([64, 128]);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let error = load_error(&dir);
    assert!(matches!(error, ModelError::Weights { .. }), "{error}");
    assert!(error.to_string().contains("unet"), "{error}");
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdserve-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
