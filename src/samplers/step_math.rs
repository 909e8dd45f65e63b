//! Tensor helpers shared by the samplers: float32 scalar arithmetic that rounds like
//! torch's (tensor ⊗ 0-d float32 tensor) ops, batch noise from per-item generators, and
//! argument checks.

use candle_core::{DType, Error, Result, Tensor};

use super::TorchGenerator;

/// `tensor * scalar`, one float32 rounding per element (as torch's mul with a 0-d tensor).
pub(crate) fn mul(tensor: &Tensor, scalar: f32) -> Result<Tensor> {
    tensor.affine(scalar as f64, 0.0)
}

/// `tensor / scalar` as a true division (not a multiplication by the reciprocal, which
/// rounds differently from torch).
pub(crate) fn div(tensor: &Tensor, scalar: f32) -> Result<Tensor> {
    let divisor = Tensor::new(scalar, tensor.device())?.to_dtype(tensor.dtype())?;
    tensor.broadcast_div(&divisor)
}

/// The samplers do their arithmetic in float32, as diffusers does for these schedulers.
pub(crate) fn as_f32(tensor: &Tensor) -> Result<Tensor> {
    tensor.to_dtype(DType::F32)
}

/// Fails unless `step_index` addresses one of the `steps` timesteps.
pub(crate) fn check_step_index(step_index: usize, steps: usize) -> Result<()> {
    if step_index >= steps {
        return Err(Error::Msg(format!(
            "step_index {step_index} is out of range for a {steps}-step schedule"
        )));
    }
    Ok(())
}

/// Fails unless `model_output` and `sample` have the same shape.
pub(crate) fn check_same_shape(model_output: &Tensor, sample: &Tensor) -> Result<()> {
    if model_output.dims() != sample.dims() {
        return Err(Error::Msg(format!(
            "model output shape {:?} differs from sample shape {:?}",
            model_output.dims(),
            sample.dims()
        )));
    }
    Ok(())
}

/// Standard normal noise shaped like `like` (float32, on its device): batch item `i` is
/// drawn from `generators[i]` with the per-item shape [1, ...], as diffusers' `randn_tensor`
/// does with a list of generators.
pub(crate) fn batch_noise(generators: &mut [TorchGenerator], like: &Tensor) -> Result<Tensor> {
    let dims = like.dims();
    let batch = dims.first().copied().unwrap_or(0);
    if batch != generators.len() {
        return Err(Error::Msg(format!(
            "got {} random generators for a batch of {batch}; pass one per batch item",
            generators.len()
        )));
    }
    let mut item_shape = dims.to_vec();
    item_shape[0] = 1;
    let items = generators
        .iter_mut()
        .map(|generator| generator.randn_tensor(item_shape.as_slice(), like.device()))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&items, 0)
}

/// The sigma samplers' `add_noise`: `original + noise * sigma`, in float32.
pub(crate) fn add_sigma_noise(original: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    check_same_shape(noise, original)?;
    as_f32(original)? + mul(&as_f32(noise)?, sigma)?
}
