//! Tiled VAE (diffusers' `enable_tiling`): parity with diffusers' tiled decode and encode
//! on the tiny sd1 fixture (whose own config makes 64-pixel tiles, so a 128×128 decode
//! runs in 3×3 tiles; reference from tools/make_vae_tiling_refs.py), and on the trained
//! bundled `shapes` VAE: tiled vs untiled decode differ little and show no seams.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdserve::models::loader;
use sdserve::models::vae_tiling::{self, TileLayout};

/// Float parity with diffusers' tiled passes (same bar as the component parity tests).
const PARITY_TOLERANCE: f32 = 1e-4;
/// Tiled vs untiled decode of a texture: mean |Δ| in /255. Measured 14.1/255 (max 218):
/// not seams but this tiny VAE's size sensitivity: trained on 32-pixel crops, it decodes
/// a 192-pixel latent whole noticeably worse than in 128-pixel tiles (the untiled image
/// is greyer, with edge artefacts; the tiled one is cleaner). Real VAEs with 512-pixel
/// tiles are far less size-sensitive; no such weights can be used here.
const MEAN_TOLERANCE: f32 = 16.0;
/// How much more a tiled image may step across a tile border than the untiled one, /255.
const SEAM_TOLERANCE: f32 = 1.0;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn reference() -> HashMap<String, Tensor> {
    let path = root().join("tests/fixtures/reference/vae_tiling_sd1.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).expect("reference loads")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[test]
fn tiled_decode_and_encode_match_diffusers() {
    let refs = reference();
    let model = loader::load(&root().join("tests/fixtures/sd1"), &Device::Cpu, DType::F32).unwrap();
    let layout = TileLayout::from_config(&model.layout.vae);
    assert_eq!((layout.sample_tile, layout.latent_tile), (64, 8), "diffusers' tile sizes");
    let latents = &refs["latents"];
    assert!(layout.tiles_latents(16, 16));
    let decoded = vae_tiling::decode(&model.vae, latents, Some(&layout)).unwrap();
    let difference = max_abs_diff(&decoded, &refs["decoded_tiled"]);
    println!("tiled decode vs diffusers: max |Δ| = {difference:e}");
    assert!(difference <= PARITY_TOLERANCE, "tiled decode: max |Δ| {difference}");

    let image = refs["image"].to_dtype(DType::F32).unwrap();
    let encoded = vae_tiling::encode(&model.vae, &image, Some(&layout)).unwrap();
    for (name, ours) in
        [("encoded_tiled_mean", &encoded.mean), ("encoded_tiled_logvar", &encoded.logvar)]
    {
        let difference = max_abs_diff(ours, &refs[name]);
        println!("{name} vs diffusers: max |Δ| = {difference:e}");
        assert!(difference <= PARITY_TOLERANCE, "{name}: max |Δ| {difference}");
    }
}

/// Mean |horizontal step| of a `[1, 3, H, W]` image in [0, 255] between columns `x - 1`
/// and `x`.
fn column_step(image: &Tensor, x: usize) -> f32 {
    let left = image.narrow(3, x - 1, 1).unwrap();
    let right = image.narrow(3, x, 1).unwrap();
    (left - right).unwrap().abs().unwrap().mean_all().unwrap().to_scalar().unwrap()
}

/// Per-tile GroupNorm and attention see only their tile (as in diffusers), so tiles agree
/// with the untiled pass where their statistics match the whole image's: a homogeneous
/// texture here, in 128-pixel tiles (16 latents; the tiny VAE's own 64-pixel tiles are
/// too small for its receptive field). On images whose tiles differ (one shape on a flat
/// background), tiles shift colour; see README, "Memory".
#[test]
fn tiled_and_untiled_decodes_of_a_texture_agree_without_visible_seams() {
    let model = loader::load(&root().join("models/shapes"), &Device::Cpu, DType::F32).unwrap();
    let layout = TileLayout { sample_tile: 128, latent_tile: 16, overlap_factor: 0.25 };
    // 24 latents: two tiles per side (0..16 and 12..24), no sliver tile at the end.
    let side = 192usize;
    let mut pixels = Vec::with_capacity(3 * side * side);
    for channel in 0..3 {
        for y in 0..side {
            for x in 0..side {
                let (x, y) = (x as f32, y as f32);
                let value = match channel {
                    0 => 0.6 * (x * std::f32::consts::TAU / 32.0).sin(),
                    1 => 0.6 * (y * std::f32::consts::TAU / 32.0).cos(),
                    _ => 0.3 * ((x + y) * std::f32::consts::TAU / 64.0).sin(),
                };
                pixels.push(value);
            }
        }
    }
    let image = Tensor::from_vec(pixels, (1, 3, side, side), &Device::Cpu).unwrap();
    let latents = model.vae.encode(&image).unwrap().mean;
    let to_255 = |t: Tensor| ((t * 0.5).unwrap() + 0.5).unwrap().clamp(0f32, 1f32).unwrap() * 255.0;
    let tiled = to_255(vae_tiling::decode(&model.vae, &latents, Some(&layout)).unwrap()).unwrap();
    let untiled = to_255(vae_tiling::decode(&model.vae, &latents, None).unwrap()).unwrap();
    let max = max_abs_diff(&tiled, &untiled);
    let mean: f32 =
        (&tiled - &untiled).unwrap().abs().unwrap().mean_all().unwrap().to_scalar().unwrap();
    println!("tiled vs untiled {side}x{side}: max |Δ| {max:.1}/255, mean |Δ| {mean:.2}/255");

    // Seams: where tiles meet (every 96 pixels: 128-pixel tiles minus the 32-pixel
    // blend), the tiled image must not step more than the untiled one does there, nor
    // much more than it steps one texture period (32 pixels) to either side, away from
    // the border (columns, then rows).
    let border_every =
        layout.sample_tile - (layout.sample_tile as f64 * layout.overlap_factor) as usize;
    let tiled_rows = tiled.transpose(2, 3).unwrap();
    let untiled_rows = untiled.transpose(2, 3).unwrap();
    for (direction, tiled, untiled) in
        [("column", &tiled, &untiled), ("row", &tiled_rows, &untiled_rows)]
    {
        for x in (border_every..side).step_by(border_every) {
            let typical = (column_step(tiled, x - 32) + column_step(tiled, x + 32)) / 2.0;
            let (tiled_step, untiled_step) = (column_step(tiled, x), column_step(untiled, x));
            println!(
                "{direction} {x}: mean step tiled {tiled_step:.2}/255, untiled \
                 {untiled_step:.2}/255, tiled a period away {typical:.2}/255"
            );
            assert!(
                tiled_step <= typical * 1.5 + SEAM_TOLERANCE,
                "seam at {direction} {x}: steps {tiled_step:.2}/255, typically {typical:.2}/255"
            );
            assert!(
                tiled_step <= untiled_step + SEAM_TOLERANCE,
                "seam at {direction} {x}: tiled steps {tiled_step:.2}/255, untiled \
                 {untiled_step:.2}/255"
            );
        }
    }
    assert!(mean <= MEAN_TOLERANCE, "tiled vs untiled mean |Δ| {mean}/255");
}

#[test]
fn sliced_attention_equals_unsliced() {
    use sdserve::models::common::sliced_attention;
    let device = Device::Cpu;
    let query = Tensor::randn(0f32, 1.0, (2, 3, 100, 8), &device).unwrap();
    let key = Tensor::randn(0f32, 1.0, (2, 3, 77, 8), &device).unwrap();
    let value = Tensor::randn(0f32, 1.0, (2, 3, 77, 8), &device).unwrap();
    let row_mask = Tensor::randn(0f32, 1.0, (1, 1, 100, 77), &device).unwrap();
    for mask in [None, Some(&row_mask)] {
        let whole = sliced_attention(&query, &key, &value, mask, false, 100).unwrap();
        for rows in [1, 7, 64] {
            let sliced = sliced_attention(&query, &key, &value, mask, false, rows).unwrap();
            let difference = max_abs_diff(&whole, &sliced);
            println!(
                "attention sliced by {rows} rows, mask {}: max |Δ| {difference:e}",
                mask.is_some()
            );
            assert!(difference <= 1e-5, "sliced attention differs by {difference}");
        }
    }
}
