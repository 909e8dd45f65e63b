//! Tiled and sliced VAE encode/decode, so large images fit in little memory: the input is
//! cut into overlapping tiles that run through the VAE's public [`AutoencoderKl::encode`] /
//! [`AutoencoderKl::decode`] one at a time, and the overlaps are blended linearly.
//!
//! Follows diffusers' `AutoencoderKL.enable_tiling()` (`tiled_decode`, `_tiled_encode`,
//! `blend_v`, `blend_h`) step for step: tile size from the VAE config's `sample_size`,
//! latent tile = sample tile / 2^(levels - 1), overlap factor 0.25, tiles visited row by
//! row, each tile first blended with the (already blended) tile above, then with the
//! (already blended) tile to its left, then cropped to its non-overlapping part. Slicing
//! (diffusers' `enable_slicing`) runs a batch one image at a time.

use candle_core::{Result, Tensor};

use super::vae::{AutoencoderKl, LatentDistribution, VaeConfig};

/// diffusers' `tile_overlap_factor`.
pub const DEFAULT_OVERLAP_FACTOR: f64 = 0.25;

/// How images are cut into tiles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileLayout {
    /// Tile side in pixels (diffusers' `tile_sample_min_size`).
    pub sample_tile: usize,
    /// Tile side in latent pixels (diffusers' `tile_latent_min_size`).
    pub latent_tile: usize,
    /// Fraction of a tile shared with its neighbour (diffusers' `tile_overlap_factor`).
    pub overlap_factor: f64,
}

impl TileLayout {
    /// The layout diffusers derives from the VAE config: `sample_size` (its first value
    /// when a list; 512 when absent) and `2^(levels - 1)` pixels per latent pixel.
    pub fn from_config(config: &VaeConfig) -> TileLayout {
        let sample_tile = match &config.sample_size {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as usize),
            Some(serde_json::Value::Array(values)) => {
                values.first().and_then(|v| v.as_u64()).map(|v| v as usize)
            }
            _ => None,
        }
        .filter(|&size| size > 0)
        .unwrap_or(512);
        let scale = 1usize << config.block_out_channels.len().saturating_sub(1);
        TileLayout {
            sample_tile,
            latent_tile: (sample_tile / scale).max(1),
            overlap_factor: DEFAULT_OVERLAP_FACTOR,
        }
    }

    /// Whether diffusers would tile a decode of `[.., height, width]` latents.
    pub fn tiles_latents(&self, height: usize, width: usize) -> bool {
        height > self.latent_tile || width > self.latent_tile
    }

    /// Whether diffusers would tile an encode of `[.., height, width]` images.
    pub fn tiles_images(&self, height: usize, width: usize) -> bool {
        height > self.sample_tile || width > self.sample_tile
    }
}

/// The walk over one tiled pass: input tiles of `input_tile` every `stride`, output
/// tiles blended over `blend` and cropped to `keep`.
struct TileWalk {
    input_tile: usize,
    stride: usize,
    blend: usize,
    keep: usize,
}

impl TileWalk {
    /// diffusers' integer arithmetic: `int(tile * (1 - overlap))`, `int(out * overlap)`.
    fn new(input_tile: usize, output_tile: usize, overlap_factor: f64) -> TileWalk {
        let stride = ((input_tile as f64 * (1.0 - overlap_factor)) as usize).max(1);
        let blend = (output_tile as f64 * overlap_factor) as usize;
        TileWalk { input_tile, stride, blend, keep: output_tile.saturating_sub(blend).max(1) }
    }

    /// Runs `tile_fn` on every tile of `input` (`[b, c, h, w]`) and stitches the outputs.
    fn run(&self, input: &Tensor, tile_fn: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (_, _, height, width) = input.dims4()?;
        let mut previous_row: Vec<Tensor> = Vec::new();
        let mut stitched_rows = Vec::new();
        for top in (0..height).step_by(self.stride) {
            let tile_height = self.input_tile.min(height - top);
            let mut row: Vec<Tensor> = Vec::new();
            let mut kept = Vec::new();
            for (column, left) in (0..width).step_by(self.stride).enumerate() {
                let tile_width = self.input_tile.min(width - left);
                let tile = input.narrow(2, top, tile_height)?.narrow(3, left, tile_width)?;
                let mut output = tile_fn(&tile.contiguous()?)?;
                if let Some(above) = previous_row.get(column) {
                    output = blend(above, &output, self.blend, 2)?;
                }
                if let Some(before) = row.last() {
                    output = blend(before, &output, self.blend, 3)?;
                }
                let (_, _, out_height, out_width) = output.dims4()?;
                kept.push(output.narrow(2, 0, self.keep.min(out_height))?.narrow(
                    3,
                    0,
                    self.keep.min(out_width),
                )?);
                row.push(output);
            }
            stitched_rows.push(Tensor::cat(&kept, 3)?);
            // Only the row above is needed for blending: earlier tiles are let go.
            previous_row = row;
        }
        Tensor::cat(&stitched_rows, 2)
    }
}

/// diffusers' `blend_v` (`dim` 2) / `blend_h` (`dim` 3): the first `extent` rows (columns)
/// of `current` fade from the last `extent` of `previous` to `current`'s own values.
fn blend(previous: &Tensor, current: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(previous.dim(dim)?).min(current.dim(dim)?);
    if extent == 0 {
        return Ok(current.clone());
    }
    let mut shape = vec![1usize; 4];
    shape[dim] = extent;
    // torch multiplies an f32 tensor by the Python float rounded to f32.
    let take: Vec<f32> = (0..extent).map(|i| (i as f64 / extent as f64) as f32).collect();
    let keep: Vec<f32> = (0..extent).map(|i| (1.0 - i as f64 / extent as f64) as f32).collect();
    let device = current.device();
    let dtype = current.dtype();
    let take = Tensor::from_vec(take, shape.as_slice(), device)?.to_dtype(dtype)?;
    let keep = Tensor::from_vec(keep, shape.as_slice(), device)?.to_dtype(dtype)?;
    let tail = previous.narrow(dim, previous.dim(dim)? - extent, extent)?;
    let head = current.narrow(dim, 0, extent)?;
    let blended = (tail.broadcast_mul(&keep)? + head.broadcast_mul(&take)?)?;
    let rest = current.dim(dim)? - extent;
    if rest == 0 {
        return Ok(blended);
    }
    Tensor::cat(&[blended, current.narrow(dim, extent, rest)?], dim)
}

/// Runs `per_image` on each image of a batch separately (diffusers' VAE slicing) and
/// concatenates the results.
fn sliced(batch: &Tensor, per_image: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let count = batch.dim(0)?;
    if count == 1 {
        return per_image(batch);
    }
    let outputs =
        (0..count).map(|i| per_image(&batch.narrow(0, i, 1)?)).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outputs, 0)
}

/// Decodes latents; with `tiling`, one image at a time (slicing), each tiled when larger
/// than a tile (as diffusers with slicing and tiling enabled); without, the whole batch
/// at once.
pub fn decode(
    vae: &AutoencoderKl,
    latents: &Tensor,
    tiling: Option<&TileLayout>,
) -> Result<Tensor> {
    if tiling.is_none() {
        return vae.decode(latents);
    }
    sliced(latents, |one| {
        let (_, _, height, width) = one.dims4()?;
        match tiling {
            Some(layout) if layout.tiles_latents(height, width) => {
                let walk =
                    TileWalk::new(layout.latent_tile, layout.sample_tile, layout.overlap_factor);
                walk.run(one, &|tile| vae.decode(tile))
            }
            _ => vae.decode(one),
        }
    })
}

/// Encodes images; with `tiling`, one at a time, each tiled when larger than a tile. Tiles blend the distribution's mean and log-variance; the VAE
/// clamps each tile's log-variance to [-30, 20] before the blend (diffusers clamps after
/// it), which differs only where a log-variance leaves that range.
pub fn encode(
    vae: &AutoencoderKl,
    images: &Tensor,
    tiling: Option<&TileLayout>,
) -> Result<LatentDistribution> {
    let latent = vae.config().latent_channels;
    let moments = |tile: &Tensor| -> Result<Tensor> {
        let distribution = vae.encode(tile)?;
        Tensor::cat(&[distribution.mean, distribution.logvar], 1)
    };
    if tiling.is_none() {
        return vae.encode(images);
    }
    let moments = sliced(images, |one| {
        let (_, _, height, width) = one.dims4()?;
        match tiling {
            Some(layout) if layout.tiles_images(height, width) => {
                let walk =
                    TileWalk::new(layout.sample_tile, layout.latent_tile, layout.overlap_factor);
                walk.run(one, &moments)
            }
            _ => moments(one),
        }
    })?;
    Ok(LatentDistribution {
        mean: moments.narrow(1, 0, latent)?,
        logvar: moments.narrow(1, latent, latent)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ramp(rows: usize, columns: usize, value: f32) -> Tensor {
        Tensor::full(value, (1, 1, rows, columns), &Device::Cpu).unwrap()
    }

    #[test]
    fn blending_fades_linearly_from_the_previous_tile() {
        let previous = ramp(2, 4, 10.0);
        let current = ramp(2, 4, 0.0);
        let blended = blend(&previous, &current, 4, 3).unwrap();
        let row: Vec<f32> =
            blended.get(0).unwrap().get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert_eq!(row, vec![10.0, 7.5, 5.0, 2.5]);
        // An extent larger than either tile shrinks to fit, as in diffusers.
        let short = ramp(2, 2, 0.0);
        assert_eq!(blend(&previous, &short, 4, 3).unwrap().dims4().unwrap(), (1, 1, 2, 2));
    }

    #[test]
    fn the_walk_covers_the_input_exactly_once_with_identity_tiles() {
        // With an identity "network", overlapping tiles blend to the input itself.
        let input = Tensor::arange(0f32, 20.0 * 13.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 20, 13))
            .unwrap();
        let walk = TileWalk::new(8, 8, 0.25);
        let output = walk.run(&input, &|tile| Ok(tile.clone())).unwrap();
        assert_eq!(output.dims4().unwrap(), (1, 1, 20, 13));
        let difference: f32 =
            (output - &input).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(difference < 1e-4, "identity tiles must stitch to the input, max |Δ| {difference}");
    }
}
