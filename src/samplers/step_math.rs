//! Tensor helpers shared by the samplers: float32 scalar arithmetic that rounds like
//! torch's (tensor ⊗ 0-d float32 tensor) ops, batch noise from per-item generators,
//! argument checks, the variance-preserving (VP) arithmetic the DDPM family and the
//! DPM-Solver family share (noising, and x0 / noise predictions from the model output),
//! and the sigma arithmetic of the Euler family (model input scaling, ancestral splits).

use candle_core::{DType, Error, Result, Tensor};

use super::{PredictionType, SchedulerConfig, TorchGenerator};

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

/// Fails unless the noise scale `s_noise` is a finite number >= 0.
pub(crate) fn check_s_noise(s_noise: f64) -> Result<()> {
    if !(s_noise.is_finite() && s_noise >= 0.0) {
        return Err(Error::Msg(format!("s_noise must be a finite number >= 0, got {s_noise}")));
    }
    Ok(())
}

/// The config's `clip_sample_range` when `clip_sample` is on, validated (> 0, finite), as
/// the DDIM-family classes clamp their x0 prediction with it.
pub(crate) fn clip_range(config: &SchedulerConfig) -> Result<Option<f32>> {
    if !config.clip_sample {
        return Ok(None);
    }
    let range = config.clip_sample_range;
    if !(range.is_finite() && range > 0.0) {
        return Err(Error::Msg(format!(
            "scheduler config: clip_sample_range must be > 0, got {range}"
        )));
    }
    Ok(Some(range as f32))
}

/// diffusers' `clip_sample`: clamps the x0 prediction to ±`range` when there is one.
pub(crate) fn clip(original: Tensor, range: Option<f32>) -> Result<Tensor> {
    match range {
        Some(range) => original.clamp(-range, range),
        None => Ok(original),
    }
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

/// A step's inputs checked (`step_index` addresses one of `steps` timesteps, the shapes
/// agree) and lifted to float32, with the dtype to hand the result back in:
/// `(out_dtype, model_output, sample)`.
pub(crate) fn step_inputs(
    model_output: &Tensor,
    step_index: usize,
    sample: &Tensor,
    steps: usize,
) -> Result<(DType, Tensor, Tensor)> {
    check_step_index(step_index, steps)?;
    check_same_shape(model_output, sample)?;
    Ok((sample.dtype(), as_f32(model_output)?, as_f32(sample)?))
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

/// diffusers' `_sigma_to_alpha_sigma_t` in float32: (alpha_t, sigma_t) of VP coordinates
/// for the Karras-style noise level `sigma`.
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// lambda = log(alpha) − log(sigma), float32 (the DPM-Solvers' log-SNR / 2).
pub(crate) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// VP `add_noise`: `alpha * original + sigma * noise`, in float32 (diffusers' DPM-Solver
/// family at a sigma, see [`alpha_sigma`]).
pub(crate) fn add_vp_noise(
    original: &Tensor,
    noise: &Tensor,
    alpha: f32,
    sigma: f32,
) -> Result<Tensor> {
    check_same_shape(noise, original)?;
    mul(&as_f32(original)?, alpha)? + mul(&as_f32(noise)?, sigma)?
}

/// diffusers' DDPM-style `add_noise` at a training timestep with cumulative alpha ᾱ:
/// sqrt(ᾱ) x0 + sqrt(1 − ᾱ) noise, float32.
pub(crate) fn add_alpha_noise(
    original: &Tensor,
    noise: &Tensor,
    alpha_cumprod: f32,
) -> Result<Tensor> {
    add_vp_noise(original, noise, alpha_cumprod.sqrt(), (1.0 - alpha_cumprod).sqrt())
}

/// The data prediction x0 from the model output at VP coordinates (`alpha`, `sigma`):
/// (sample − sigma·ε) / alpha, the sample itself, or alpha·sample − sigma·v (diffusers'
/// DDIM/DDPM step and DPM-Solver `convert_model_output`; for the DDPM family alpha =
/// sqrt(ᾱ_t), sigma = sqrt(1 − ᾱ_t)).
pub(crate) fn vp_data_prediction(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha: f32,
    sigma: f32,
) -> Result<Tensor> {
    match prediction_type {
        PredictionType::Epsilon => div(&(sample - mul(model_output, sigma)?)?, alpha),
        PredictionType::Sample => Ok(model_output.clone()),
        PredictionType::VPrediction => mul(sample, alpha)? - mul(model_output, sigma)?,
    }
}

/// The DPM-Solver family's data prediction x0 at the Karras-style noise level `sigma`
/// (diffusers' `convert_model_output` for the dpmsolver++ / UniPC / DEIS classes).
pub(crate) fn vp_data_prediction_at_sigma(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    vp_data_prediction(prediction_type, model_output, sample, alpha_t, sigma_t)
}

/// The data prediction x0 and the noise prediction ε from the model output at VP
/// coordinates (`alpha`, `sigma`), as diffusers' DDIM and TCD steps compute them.
pub(crate) fn vp_data_and_noise(
    prediction_type: PredictionType,
    model_output: Tensor,
    sample: &Tensor,
    alpha: f32,
    sigma: f32,
) -> Result<(Tensor, Tensor)> {
    Ok(match prediction_type {
        PredictionType::Epsilon => {
            let original = div(&(sample - mul(&model_output, sigma)?)?, alpha)?;
            (original, model_output)
        }
        PredictionType::Sample => {
            let epsilon = div(&(sample - mul(&model_output, alpha)?)?, sigma)?;
            (model_output, epsilon)
        }
        PredictionType::VPrediction => {
            let original = (mul(sample, alpha)? - mul(&model_output, sigma)?)?;
            let epsilon = (mul(&model_output, alpha)? + mul(sample, sigma)?)?;
            (original, epsilon)
        }
    })
}

/// The sigma samplers' `add_noise`: `original + noise * sigma`, in float32.
pub(crate) fn add_sigma_noise(original: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    check_same_shape(noise, original)?;
    as_f32(original)? + mul(&as_f32(noise)?, sigma)?
}

/// diffusers' `scale_model_input` for the Euler family: sample / sqrt(sigma² + 1).
pub(crate) fn scale_for_sigma(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    let out_dtype = sample.dtype();
    div(&as_f32(sample)?, (sigma * sigma + 1.0).sqrt())?.to_dtype(out_dtype)
}

/// The noise sigma_up an ancestral step from `sigma_from` to `sigma_to` adds, float32:
/// sqrt(sigma_to² (sigma_from² − sigma_to²) / sigma_from²), evaluated in the order diffusers'
/// ancestral classes and k-diffusion's `get_ancestral_step` (eta 1) both use.
fn ancestral_sigma_up(sigma_from: f32, sigma_to: f32) -> f32 {
    let (from_sq, to_sq) = (sigma_from * sigma_from, sigma_to * sigma_to);
    (to_sq * (from_sq - to_sq) / from_sq).sqrt()
}

/// diffusers' ancestral split (`EulerAncestralDiscreteScheduler`,
/// `KDPM2AncestralDiscreteScheduler`), float32: (sigma_down, sigma_up). Unlike
/// [`kdiffusion_ancestral_step`] it does not clamp sigma_up to sigma_to, and a float32
/// rounding can put sigma_up an ulp above it, so the two stay apart for parity.
pub(crate) fn diffusers_ancestral_step(sigma_from: f32, sigma_to: f32) -> (f32, f32) {
    let up = ancestral_sigma_up(sigma_from, sigma_to);
    ((sigma_to * sigma_to - up * up).sqrt(), up)
}

/// k-diffusion's `get_ancestral_step` with eta 1, float32: (sigma_down, sigma_up), with
/// sigma_up clamped to sigma_to as k-diffusion does (see [`diffusers_ancestral_step`]).
pub(crate) fn kdiffusion_ancestral_step(sigma_from: f32, sigma_to: f32) -> (f32, f32) {
    let up = sigma_to.min(ancestral_sigma_up(sigma_from, sigma_to));
    ((sigma_to * sigma_to - up * up).sqrt(), up)
}
