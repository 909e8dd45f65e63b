//! A conversion plan: for every diffusers tensor name, which checkpoint tensor it comes
//! from and how it is reshaped. Plans are built from the header alone, so every key and
//! layout check runs before a single weight is read.

use std::collections::BTreeMap;

use candle_core::Tensor;

/// How a checkpoint tensor becomes the diffusers tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reshape {
    /// Taken as stored.
    AsIs,
    /// A 1x1 convolution weight `[out, in, 1, 1]` (or `[out, in, 1]`) used as a linear
    /// weight `[out, in]`; 2D weights pass unchanged.
    ConvToLinear,
    /// Part `index` of `parts` equal slices along dim 0 (OpenCLIP's fused q/k/v).
    Chunk { index: usize, parts: usize },
    /// Transposed 2D matrix (OpenCLIP stores `text_projection` as `[in, out]`).
    Transpose,
}

/// Where one diffusers tensor comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    pub key: String,
    pub reshape: Reshape,
}

/// diffusers name → source, for one component.
pub(crate) type Plan = BTreeMap<String, Source>;

/// Adds a mapping. Two checkpoint keys claiming one diffusers name (e.g. a CLIP weight
/// stored both with and without the `text_model.` prefix) make the file ambiguous.
pub(crate) fn insert(
    plan: &mut Plan,
    diffusers: String,
    key: &str,
    reshape: Reshape,
) -> Result<(), String> {
    if let Some(previous) = plan.get(&diffusers) {
        return Err(format!(
            "{} and {key} both hold {diffusers}; the checkpoint is ambiguous",
            previous.key
        ));
    }
    plan.insert(diffusers, Source { key: key.to_string(), reshape });
    Ok(())
}

/// Applies the reshape of `source` to the stored tensor.
pub(crate) fn apply(tensor: Tensor, reshape: Reshape) -> candle_core::Result<Tensor> {
    match reshape {
        Reshape::AsIs => Ok(tensor),
        Reshape::ConvToLinear => {
            let dims = tensor.dims().to_vec();
            if dims.len() > 2 && dims[2..].iter().all(|&dim| dim == 1) {
                tensor.reshape((dims[0], dims[1]))
            } else {
                Ok(tensor)
            }
        }
        Reshape::Chunk { index, parts } => {
            let rows = tensor.dim(0)?;
            if rows % parts != 0 {
                candle_core::bail!("cannot split {rows} rows into {parts} equal parts");
            }
            let size = rows / parts;
            tensor.narrow(0, index * size, size)?.contiguous()
        }
        Reshape::Transpose => tensor.t()?.contiguous(),
    }
}
