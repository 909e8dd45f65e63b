//! A CPU random generator that reproduces torch's `torch.Generator("cpu")` + `torch.randn`
//! (float32) bit for bit, so a seed gives the same latents as diffusers.
//! See `shared/reference/torch-cpu-randn.md` for the algorithm.

use candle_core::{Device, Result, Shape, Tensor};

/// torch's CPU generator: mt19937 plus torch's normal transforms.
#[derive(Clone)]
pub struct TorchGenerator {
    // filled in by the RNG implementation
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        let _ = seed;
        todo!("torch-compatible generator")
    }

    /// `torch.randn(n, generator=g, dtype=torch.float32)`, as a flat vector.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        let _ = n;
        todo!("torch-compatible randn")
    }

    /// `torch.randn(shape, generator=g, dtype=torch.float32)` placed on `device`.
    pub fn randn_tensor<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let values = self.randn(shape.elem_count());
        Tensor::from_vec(values, shape, device)
    }
}
