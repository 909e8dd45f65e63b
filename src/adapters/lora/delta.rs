//! The weight change each LoRA-family layer makes, `scale × ΔW` in the shape of the weight
//! it adapts (linear `[out, in]` or convolution `[out, in, kh, kw]`), computed in f32.
//!
//! - LoRA / LoCon: `ΔW = up · down`, convolutions flattened to `[out, r] · [r, in·kh·kw]`.
//! - LoHa: `ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b)`; with Tucker cores (`hada_t1`, `hada_t2`,
//!   `[r, r, kh, kw]`, and `w*_a` `[r, out]`, `w*_b` `[r, in]`), each factor is
//!   `W[p, q, k, l] = Σ_ij t[i, j, k, l] · b[j, q] · a[i, p]`.
//! - LoKr: `ΔW = kron(w1, w2)`, each factor full or `a · b`; a 2-D result is reshaped to
//!   a convolution's shape (the flattened layout is the same as a 4-D Kronecker product).
//!
//! `scale = alpha / rank` (kohya), 1 without alpha or rank.

use candle_core::{Result, Tensor};

use super::{KronFactor, LayerFactors, LoraLayer};

fn flat(tensor: &Tensor) -> Result<Tensor> {
    let rows = tensor.dim(0)?;
    tensor.reshape((rows, ()))
}

/// `a [p, q]`-shaped matmul of two factors, each flattened to 2-D first.
fn product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    flat(a)?.matmul(&flat(b)?)
}

/// `W[p, q, k, l] = Σ_ij core[i, j, k, l] · b[j, q] · a[i, p]` for a LoHa Tucker factor.
fn tucker(core: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (i, j, kh, kw) = core.dims4()?;
    let b = flat(b)?; // [j, in]
    let a = flat(a)?; // [i, out]
    let inputs = b.dim(1)?;
    // [i, kh, kw, j] · [j, in] → [i, kh, kw, in]
    let inner = core.permute((0, 2, 3, 1))?.reshape((i * kh * kw, j))?.matmul(&b)?;
    // [out, i] · [i, kh·kw·in] → [out, kh, kw, in] → [out, in, kh, kw]
    let outer = a.t()?.matmul(&inner.reshape((i, kh * kw * inputs))?)?;
    outer.reshape(((), kh, kw, inputs))?.permute((0, 3, 1, 2))?.contiguous()
}

fn kron_factor(factor: &KronFactor) -> Result<Tensor> {
    match factor {
        KronFactor::Full(w) => Ok(w.clone()),
        KronFactor::LowRank { a, b } => product(a, b),
    }
}

/// The Kronecker product of two 2-D matrices: `[a·c, b·d]`.
fn kron(left: &Tensor, right: &Tensor) -> Result<Tensor> {
    let (a, b) = left.dims2()?;
    let (c, d) = right.dims2()?;
    let left = left.reshape((a, 1, b, 1))?;
    let right = right.reshape((1, c, 1, d))?;
    left.broadcast_mul(&right)?.reshape((a * c, b * d))
}

/// `scale × ΔW` of `layer`, shaped like `target_shape`; an error when the factors do not
/// fit the weight.
pub fn layer_delta(layer: &LoraLayer, target_shape: &[usize]) -> Result<Tensor> {
    let raw = match &layer.factors {
        LayerFactors::LowRank { down, up } => product(up, down)?,
        LayerFactors::Hadamard { w1_a, w1_b, w2_a, w2_b, t1, t2 } => match (t1, t2) {
            (Some(t1), Some(t2)) => (tucker(t1, w1_a, w1_b)? * tucker(t2, w2_a, w2_b)?)?,
            _ => (product(w1_a, w1_b)? * product(w2_a, w2_b)?)?,
        },
        LayerFactors::Kronecker { w1, w2 } => {
            let (w1, w2) = (kron_factor(w1)?, kron_factor(w2)?);
            let w2 = if w2.rank() > 2 { flat(&w2)? } else { w2 };
            kron(&flat(&w1)?, &w2)?
        }
    };
    let expected: usize = target_shape.iter().product();
    if raw.elem_count() != expected {
        candle_core::bail!(
            "the adapter's update has shape {:?}, the model's weight {target_shape:?}",
            raw.dims()
        );
    }
    // A 2-D update for a 4-D weight is the flattened [out, in·kh·kw] layout.
    if raw.dim(0)? != target_shape[0] {
        candle_core::bail!(
            "the adapter's update has {} output rows, the model's weight {target_shape:?}",
            raw.dim(0)?
        );
    }
    raw.reshape(target_shape)? * layer.scale()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn low_rank_uses_alpha_over_rank() {
        let layer = LoraLayer {
            key: "x".into(),
            factors: LayerFactors::LowRank {
                down: t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]),
                up: t(&[1.0, 0.0, 0.0, 1.0], &[2, 2]),
            },
            alpha: Some(1.0),
        };
        let delta = layer_delta(&layer, &[2, 2]).unwrap().flatten_all().unwrap();
        assert_eq!(delta.to_vec1::<f32>().unwrap(), vec![0.5, 1.0, 1.5, 2.0]);
    }

    #[test]
    fn kronecker_matches_its_definition() {
        let left = t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let right = t(&[0.0, 5.0, 6.0, 7.0], &[2, 2]);
        let product = kron(&left, &right).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(product[0], vec![0.0, 5.0, 0.0, 10.0]);
        assert_eq!(product[3], vec![18.0, 21.0, 24.0, 28.0]);
    }

    #[test]
    fn tucker_equals_plain_product_for_a_1x1_identity_core() {
        let a = t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]); // [r, out]
        let b = t(&[5.0, 6.0, 7.0, 8.0], &[2, 2]); // [r, in]
        let core = Tensor::eye(2, candle_core::DType::F32, &Device::Cpu)
            .unwrap()
            .reshape((2, 2, 1, 1))
            .unwrap();
        let rebuilt = tucker(&core, &a, &b).unwrap().reshape((2, 2)).unwrap();
        let expected = a.t().unwrap().matmul(&b).unwrap();
        let diff = (rebuilt - expected).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let layer = LoraLayer {
            key: "x".into(),
            factors: LayerFactors::LowRank {
                down: t(&[1.0, 2.0], &[1, 2]),
                up: t(&[1.0, 2.0], &[2, 1]),
            },
            alpha: None,
        };
        assert!(layer_delta(&layer, &[3, 2]).is_err());
    }
}
