//! Single-file checkpoints (original LDM key layout) convert to exactly the tensors of the
//! same model saved by diffusers as a folder. The fixtures in tests/fixtures/single/ were
//! written from the diffusers folders in tests/fixtures/{sd1,sd2v,sdxl}/ by tools/.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdserve::error::ModelError;
use sdserve::models::single_file::{detect_family, load_single_file, read_configs};
use sdserve::models::ModelFamily;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn weights_file(folder: &Path, component: &str) -> PathBuf {
    let file = if component.starts_with("text_encoder") {
        "model.safetensors"
    } else {
        "diffusion_pytorch_model.safetensors"
    };
    folder.join(component).join(file)
}

fn load_folder_component(folder: &Path, component: &str) -> HashMap<String, Tensor> {
    let path = weights_file(folder, component);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|err| {
        panic!("reading {}: {err} (are the fixtures merged?)", path.display())
    })
}

fn as_f32(tensor: &Tensor) -> Vec<f32> {
    tensor.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_matches_folder(stem: &str, family: ModelFamily, components: &[&str]) {
    let single = fixtures().join("single").join(format!("{stem}.safetensors"));
    let folder = fixtures().join(stem);
    assert_eq!(detect_family(&single).unwrap(), family, "{stem}");

    let converted = load_single_file(&single, &Device::Cpu, DType::F32)
        .unwrap_or_else(|err| panic!("{stem}: {err}"));
    assert_eq!(converted.family, family);
    let names: Vec<&str> = converted.components.keys().map(String::as_str).collect();
    let mut expected_names = components.to_vec();
    expected_names.sort_unstable();
    assert_eq!(names, expected_names, "{stem}: components");

    let sidecar: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("single").join(format!("{stem}.config.json")))
            .unwrap(),
    )
    .unwrap();
    for component in components.iter().chain(&["scheduler"]) {
        assert_eq!(
            converted.configs[*component], sidecar[*component],
            "{stem}: {component} config"
        );
    }
    let (family_from_header, configs) = read_configs(&single).unwrap();
    assert_eq!(family_from_header, family);
    assert_eq!(configs, converted.configs);

    for component in components {
        let reference = load_folder_component(&folder, component);
        let tensors = &converted.components[*component];
        for (name, tensor) in tensors {
            let expected = reference
                .get(name)
                .unwrap_or_else(|| panic!("{stem}/{component}: {name} is not in the folder"));
            assert_eq!(tensor.dims(), expected.dims(), "{stem}/{component}: shape of {name}");
            assert_eq!(tensor.dtype(), DType::F32, "{stem}/{component}: dtype of {name}");
            assert_eq!(as_f32(tensor), as_f32(expected), "{stem}/{component}: values of {name}");
        }
        let mut missing: Vec<&String> =
            reference.keys().filter(|name| !tensors.contains_key(*name)).collect();
        missing.sort();
        assert!(missing.is_empty(), "{stem}/{component}: not converted: {missing:?}");
    }
}

#[test]
fn sd1_single_file_equals_the_diffusers_folder() {
    assert_matches_folder("sd1", ModelFamily::Sd1, &["unet", "vae", "text_encoder"]);
}

#[test]
fn sd2_v_single_file_equals_the_diffusers_folder() {
    assert_matches_folder("sd2v", ModelFamily::Sd2, &["unet", "vae", "text_encoder"]);
}

#[test]
fn sdxl_single_file_equals_the_diffusers_folder() {
    assert_matches_folder(
        "sdxl",
        ModelFamily::Sdxl,
        &["unet", "vae", "text_encoder", "text_encoder_2"],
    );
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdserve-it-single-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn pickle_checkpoints_are_refused() {
    let dir = scratch("pickle");
    let path = dir.join("model.ckpt");
    std::fs::write(&path, b"\x80\x02}q\x00.").unwrap();
    let error = load_single_file(&path, &Device::Cpu, DType::F32).err().unwrap();
    assert!(matches!(error, ModelError::PickleRefused(_)), "{error}");
    assert!(error.to_string().contains("arbitrary code"), "{error}");
}

#[test]
fn missing_file_is_not_found() {
    let path = scratch("missing").join("absent.safetensors");
    assert!(matches!(detect_family(&path), Err(ModelError::NotFound(_))));
}

#[test]
fn truncated_checkpoint_is_invalid_not_a_panic() {
    let bytes = std::fs::read(fixtures().join("single/sd1.safetensors")).unwrap();
    let dir = scratch("truncated");
    for (name, keep) in [("cut-data", bytes.len() - 1000), ("cut-header", 100), ("cut-length", 5)] {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, &bytes[..keep]).unwrap();
        for result in [
            load_single_file(&path, &Device::Cpu, DType::F32).map(|_| ()),
            detect_family(&path).map(|_| ()),
            read_configs(&path).map(|_| ()),
        ] {
            match result {
                Err(ModelError::InvalidSafetensors { reason, .. }) => {
                    assert!(!reason.is_empty(), "{name}")
                }
                other => panic!("{name}: expected InvalidSafetensors, got {other:?}"),
            }
        }
    }
}

#[test]
fn component_file_is_an_unknown_layout() {
    let path = weights_file(&fixtures().join("sd1"), "unet");
    match detect_family(&path) {
        Err(ModelError::UnknownLayout { reason, .. }) => {
            assert!(reason.contains("model.diffusion_model"), "{reason}");
            assert!(reason.contains("diffusers"), "{reason}");
        }
        other => panic!("expected UnknownLayout, got {other:?}"),
    }
    let vae = weights_file(&fixtures().join("sd1"), "vae");
    let reason = detect_family(&vae).unwrap_err().to_string();
    assert!(reason.contains("VAE-only"), "{reason}");
}

#[test]
fn tiny_checkpoint_without_its_sidecar_asks_for_one() {
    let dir = scratch("no-sidecar");
    let path = dir.join("tiny.safetensors");
    std::fs::copy(fixtures().join("single/sd1.safetensors"), &path).unwrap();
    let message = read_configs(&path).unwrap_err().to_string();
    assert!(message.contains("sidecar") && message.contains("tiny.config.json"), "{message}");
}

/// Writes a header-only safetensors file with the tensor names and shapes of a full-size
/// model (tests/fixtures/single_file_layouts/, made by tools/single_file_layouts.py); the
/// data section is a sparse hole, so gigabytes cost no disk.
fn sparse_checkpoint(layout: &str, dir: &Path, metadata: &[(&str, &str)]) -> PathBuf {
    let list = fixtures().join("single_file_layouts").join(format!("{layout}.json"));
    let shapes: std::collections::BTreeMap<String, Vec<usize>> =
        serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in shapes {
        let bytes = 2 * shape.iter().product::<usize>();
        let entry = serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]});
        header.insert(name, entry);
        offset += bytes;
    }
    if !metadata.is_empty() {
        let metadata: serde_json::Map<String, serde_json::Value> =
            metadata.iter().map(|(key, value)| (key.to_string(), (*value).into())).collect();
        header.insert("__metadata__".into(), metadata.into());
    }
    let header = serde_json::to_vec(&header).unwrap();
    let path = dir.join(format!("{layout}.safetensors"));
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len((bytes.len() + offset) as u64).unwrap();
    path
}

#[test]
fn full_size_layouts_resolve_to_the_published_configs() {
    let dir = scratch("full-size");
    for (layout, family, sample_size, prediction) in [
        ("sd15", ModelFamily::Sd1, 64, serde_json::Value::Null),
        ("sd21", ModelFamily::Sd2, 96, "v_prediction".into()),
        ("sdxl_base", ModelFamily::Sdxl, 128, "epsilon".into()),
        ("sdxl_refiner", ModelFamily::SdxlRefiner, 128, "epsilon".into()),
    ] {
        let path = sparse_checkpoint(layout, &dir, &[]);
        assert_eq!(detect_family(&path).unwrap(), family, "{layout}");
        let (found, configs) = read_configs(&path).unwrap_or_else(|err| panic!("{layout}: {err}"));
        assert_eq!(found, family, "{layout}");
        assert_eq!(configs["unet"]["sample_size"], sample_size, "{layout}");
        assert_eq!(configs["scheduler"]["prediction_type"], prediction, "{layout}");
    }
    // SD 2 base has the same tensors as 2.1-v; a prediction-type marker selects it.
    let sub = dir.join("base");
    std::fs::create_dir_all(&sub).unwrap();
    let base = sparse_checkpoint("sd21", &sub, &[("modelspec.prediction_type", "epsilon")]);
    let (_, configs) = read_configs(&base).unwrap();
    assert_eq!(configs["unet"]["sample_size"], 64);
    assert_eq!(configs["scheduler"]["prediction_type"], "epsilon");
}
