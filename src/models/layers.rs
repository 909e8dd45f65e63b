//! Convolution and group-norm layers (and multi-head attention) that run sdserve's own f32 CPU kernels
//! (`sdserve-cpu-kernels`) when the tensors allow it and candle's ops otherwise (GPU, f16,
//! bf16, grouped or dilated convolutions), with the same weights and results.

use candle_core::{DType, Module, Result, Storage, StorageRef, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use sdserve_cpu_kernels::winograd::{self, WinogradVariant, WinogradWeight};
use sdserve_cpu_kernels::Conv2dGeometry;
use std::sync::{Arc, OnceLock};

/// Read access to the f32 elements of a contiguous CPU tensor, holding its storage lock.
struct CpuF32<'a> {
    storage: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> CpuF32<'a> {
    /// `None` when `tensor` is not a contiguous f32 CPU tensor.
    fn of(tensor: &'a Tensor) -> Option<Self> {
        if tensor.dtype() != DType::F32 || !tensor.device().is_cpu() {
            return None;
        }
        let (storage, layout) = tensor.storage_and_layout();
        let (start, end) = layout.contiguous_offsets()?;
        matches!(&*storage, Storage::Cpu(_)).then_some(CpuF32 { storage, start, end })
    }

    fn values(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(cpu) => Ok(&cpu.as_slice::<f32>()?[self.start..self.end]),
            _ => unreachable!("CpuF32::of only accepts CPU storage"),
        }
    }
}

/// Floating-point operations (2 per multiply-accumulate) of the convolutions, matrix
/// products and attention run so far, process-wide, counted from the architecture's
/// shapes (the same whichever kernel computes them): `sdserve bench` reads it around each
/// timed part to report GFLOP/s. Elementwise work (norms, activations) is not counted.
static FLOPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The operations counted so far (see [`FLOPS`]); take differences around a run.
pub fn flop_count() -> u64 {
    FLOPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Adds `count` operations to the process-wide count.
pub(crate) fn add_flops(count: u64) {
    FLOPS.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the kernels may run: `SDSERVE_CPU_KERNELS=0` forces candle's ops everywhere,
/// for A/B timing and for ruling the kernels out when chasing a numerical difference.
fn kernels_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("SDSERVE_CPU_KERNELS").map_or(true, |v| v != "0"))
}

/// The kernels' thread count: candle's, asked once (candle 0.11 re-reads /proc/cpuinfo on
/// each call unless `RAYON_NUM_THREADS` is set).
fn kernel_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// Which Winograd algorithms 3×3 convolutions may use (when the kernels run at all), from
/// `SDSERVE_WINOGRAD`: `0` keeps them on im2col (A/B timing, numerical checks), `2` allows
/// only F(2×2,3×3) (about 5× smaller rounding error than F(4×4), half its speed-up), anything
/// else lets the kernels crate pick per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WinogradMode {
    Off,
    SmallTilesOnly,
    Auto,
}

fn winograd_mode() -> WinogradMode {
    static MODE: OnceLock<WinogradMode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("SDSERVE_WINOGRAD").as_deref() {
        Ok("0") => WinogradMode::Off,
        Ok("2") => WinogradMode::SmallTilesOnly,
        _ => WinogradMode::Auto,
    })
}

fn is_cpu_f32(tensor: &Tensor) -> bool {
    tensor.dtype() == DType::F32 && tensor.device().is_cpu() && kernels_enabled()
}

/// A 2-D convolution layer (weights `[out, in, kh, kw]`, optional bias), torch semantics.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    /// The weight in the Winograd domain, made on the first call that takes that path, for
    /// the variant that call preferred (F(4×4): 4× the weight's memory, F(2×2): 16/9×; only
    /// layers that use it pay). Later calls use it whichever variant they would prefer: one
    /// transform per layer bounds the memory. Clones share it, as they share the weight.
    winograd: Arc<OnceLock<Arc<WinogradWeight>>>,
}

/// Winograd-domain weights by the id of the weight tensor they were made from, so that
/// layers rebuilt around the same tensor share them: a request with LoRAs rebuilds the
/// networks from the base tensors plus its merged copies, and without this every 3×3
/// layer would be transformed again (≈ 0.35 CPU-s for one 1280-channel layer). Entries are
/// weak; the memory goes with the last layer holding it.
fn shared_winograd_weight(
    weight: &Tensor,
    make: impl FnOnce() -> WinogradWeight,
) -> Arc<WinogradWeight> {
    type Registry =
        std::collections::HashMap<candle_core::TensorId, std::sync::Weak<WinogradWeight>>;
    static REGISTRY: OnceLock<std::sync::Mutex<Registry>> = OnceLock::new();
    let registry = REGISTRY.get_or_init(Default::default);
    if let Some(shared) = registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(&weight.id())
        .and_then(std::sync::Weak::upgrade)
    {
        return shared;
    }
    // Transformed outside the lock; two layers racing on one tensor both transform once.
    let made = Arc::new(make());
    let mut registry = registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    registry.retain(|_, entry| entry.strong_count() > 0);
    registry.insert(weight.id(), Arc::downgrade(&made));
    made
}

impl Conv2d {
    /// Wraps candle's layer (whose forward is the fallback).
    pub fn new(inner: candle_nn::Conv2d) -> Self {
        Conv2d { inner, winograd: Arc::default() }
    }

    /// The weight tensor `[out, in / groups, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// The kernel path: f32 on CPU, groups 1, dilation 1. `None` hands over to candle.
    fn forward_cpu_f32(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let config: &Conv2dConfig = self.inner.config();
        let weight = self.inner.weight();
        if !is_cpu_f32(x) || !is_cpu_f32(weight) || config.groups != 1 || config.dilation != 1 {
            return Ok(None);
        }
        let (Ok((batch, in_channels, height, width)), Ok((out_channels, weight_in, kh, kw))) =
            (x.dims4(), weight.dims4())
        else {
            return Ok(None);
        };
        let geometry = Conv2dGeometry {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel_h: kh,
            kernel_w: kw,
            stride: config.stride,
            padding: config.padding,
        };
        let (Some(out_h), Some(out_w)) = (geometry.out_h(), geometry.out_w()) else {
            return Ok(None);
        };
        if weight_in != in_channels || self.bias().is_some_and(|b| b.dims() != [out_channels]) {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let weight = weight.contiguous()?;
        let bias = self.bias().map(Tensor::contiguous).transpose()?;
        let (Some(input), Some(weight)) = (CpuF32::of(&x), CpuF32::of(&weight)) else {
            return Ok(None);
        };
        let bias = match &bias {
            Some(bias) => match CpuF32::of(bias) {
                Some(view) => Some(view),
                None => return Ok(None),
            },
            None => None,
        };
        let bias_values = bias.as_ref().map(CpuF32::values).transpose()?;
        let threads = kernel_threads();
        let weight_values = weight.values()?;
        let variant = match (winograd_mode(), winograd::preferred_variant(&geometry)) {
            (WinogradMode::Off, _) | (_, None) => None,
            (WinogradMode::SmallTilesOnly, Some(_)) => Some(WinogradVariant::F2x2),
            (WinogradMode::Auto, preferred) => preferred,
        };
        let output = match variant {
            Some(variant) => {
                let transformed = self.winograd.get_or_init(|| {
                    shared_winograd_weight(self.inner.weight(), || {
                        WinogradWeight::new(weight_values, out_channels, in_channels, variant)
                    })
                });
                winograd::conv2d_3x3(
                    input.values()?,
                    transformed,
                    bias_values,
                    batch,
                    height,
                    width,
                    threads,
                )
            }
            None => sdserve_cpu_kernels::conv2d(
                input.values()?,
                weight_values,
                bias_values,
                &geometry,
                threads,
            ),
        };
        Tensor::from_vec(output, (batch, out_channels, out_h, out_w), x.device()).map(Some)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let output = match self.forward_cpu_f32(x)? {
            Some(output) => output,
            None => self.inner.forward(x)?,
        };
        // Each output element is a dot product over (in / groups) · kh · kw taps.
        let taps = self.weight().dims().iter().skip(1).product::<usize>();
        add_flops(2 * (output.elem_count() * taps) as u64);
        Ok(output)
    }
}

/// A convolution loaded from `vb` (`weight`, `bias`) with the given padding and stride.
pub fn conv2d(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
) -> Result<Conv2d> {
    let config = Conv2dConfig { padding, stride, ..Default::default() };
    Ok(Conv2d::new(candle_nn::conv2d(in_channels, out_channels, kernel, config, vb)?))
}

/// torch's `GroupNorm` over `[batch, channels, ...]` with per-channel affine weights, with
/// a fused "group norm then SiLU" for the ResNet blocks.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// `SiLU(group_norm(x))`, fused into one pass over the data on CPU f32.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        match self.forward_cpu_f32(x, true)? {
            Some(output) => Ok(output),
            None => candle_nn::ops::silu(&self.inner.forward(x)?),
        }
    }

    fn forward_cpu_f32(&self, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        if !is_cpu_f32(x) || !is_cpu_f32(&self.weight) || !is_cpu_f32(&self.bias) || x.rank() < 3 {
            return Ok(None);
        }
        let dims = x.dims();
        let (batch, channels) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        if channels != self.weight.elem_count() || !channels.is_multiple_of(self.groups) {
            return Ok(None);
        }
        let x_contiguous = x.contiguous()?;
        let (Some(input), Some(gamma), Some(beta)) =
            (CpuF32::of(&x_contiguous), CpuF32::of(&self.weight), CpuF32::of(&self.bias))
        else {
            return Ok(None);
        };
        let output = sdserve_cpu_kernels::group_norm(
            input.values()?,
            batch,
            channels,
            spatial,
            self.groups,
            self.eps as f32,
            gamma.values()?,
            beta.values()?,
            silu,
        );
        Tensor::from_vec(output, dims, x.device()).map(Some)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.forward_cpu_f32(x, false)? {
            Some(output) => Ok(output),
            None => self.inner.forward(x),
        }
    }
}

/// A group norm loaded from `vb` (`weight`, `bias`).
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm { inner, weight, bias, groups, eps })
}

/// Multi-head attention of token-major projections (`query` `[batch, tokens, heads ·
/// head_dim]`, `key`/`value` `[batch, key_tokens, heads · head_dim]`) by the kernels'
/// blocked attention, plus `weight ·` the attention to each of `extras`' (key, value,
/// weight) with the same queries (IP-Adapter). Returns `[batch, tokens, heads · head_dim]`,
/// or `None` to hand over to candle's ops (not f32 on CPU, kernels off, mismatched shapes).
pub fn blocked_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: usize,
    extras: &[(Tensor, Tensor, f32)],
) -> Result<Option<Tensor>> {
    let all_f32 = [query, key, value]
        .into_iter()
        .chain(extras.iter().flat_map(|(k, v, _)| [k, v]))
        .all(is_cpu_f32);
    let Ok((batch, query_tokens, width)) = query.dims3() else {
        return Ok(None);
    };
    if !all_f32 || heads == 0 || width % heads != 0 {
        return Ok(None);
    }
    let shape_of = |key: &Tensor, value: &Tensor| -> Option<usize> {
        let (kb, key_tokens, kw) = key.dims3().ok()?;
        (kb == batch && kw == width && value.dims() == key.dims()).then_some(key_tokens)
    };
    let geometry = |key_tokens| sdserve_cpu_kernels::AttentionGeometry {
        batch,
        heads,
        query_tokens,
        key_tokens,
        head_dim: width / heads,
    };
    let Some(key_tokens) = shape_of(key, value) else {
        return Ok(None);
    };
    if extras.iter().any(|(k, v, _)| shape_of(k, v).is_none()) {
        return Ok(None);
    }
    let scale = (1.0 / ((width / heads) as f64).sqrt()) as f32;
    let threads = kernel_threads();
    let contiguous = |t: &Tensor| t.contiguous();
    let (query, key, value) = (contiguous(query)?, contiguous(key)?, contiguous(value)?);
    let (Some(q), Some(k), Some(v)) = (CpuF32::of(&query), CpuF32::of(&key), CpuF32::of(&value))
    else {
        return Ok(None);
    };
    let attention_flops =
        |key_tokens: usize| 4 * (batch * query_tokens * key_tokens * width) as u64;
    add_flops(attention_flops(key_tokens));
    let mut output = sdserve_cpu_kernels::attention(
        q.values()?,
        k.values()?,
        v.values()?,
        &geometry(key_tokens),
        scale,
        threads,
    );
    for (extra_key, extra_value, weight) in extras {
        let (extra_key, extra_value) = (contiguous(extra_key)?, contiguous(extra_value)?);
        let (Some(ek), Some(ev)) = (CpuF32::of(&extra_key), CpuF32::of(&extra_value)) else {
            return Ok(None);
        };
        add_flops(attention_flops(extra_key.dim(1)?));
        sdserve_cpu_kernels::attention_into(
            &mut output,
            1.0,
            q.values()?,
            ek.values()?,
            ev.values()?,
            &geometry(extra_key.dim(1)?),
            scale,
            *weight,
            threads,
        );
    }
    Tensor::from_vec(output, (batch, query_tokens, width), query.device()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The kernels against candle's own ops on the shapes SD uses (3×3 pad 1 on im2col and on
    /// Winograd, 3×3 stride 2, 1×1, the VAE encoder's unpadded stride-2 downsampler) and odd
    /// sizes.
    #[test]
    fn conv2d_matches_candle() -> Result<()> {
        let device = Device::Cpu;
        let cases = [
            (2, 8, 9, 7, 6, 3, 1, 1, true),
            (1, 5, 11, 10, 4, 3, 2, 1, true),
            (1, 6, 9, 9, 3, 3, 2, 0, false),
            (2, 7, 5, 6, 9, 1, 1, 0, true),
            (1, 4, 8, 8, 4, 1, 1, 0, false),
            (1, 4, 3, 5, 2, 3, 1, 1, false),
            // Enough channels and tiles for Winograd F(4×4) (odd size, twice: cached weight),
            // and few enough tiles for F(2×2).
            (2, 40, 13, 10, 36, 3, 1, 1, true),
            (2, 40, 13, 10, 36, 3, 1, 1, true),
            (2, 40, 6, 5, 36, 3, 1, 1, true),
        ];
        for (batch, cin, h, w, cout, k, stride, padding, with_bias) in cases {
            let x = Tensor::randn(0f32, 1.0, (batch, cin, h, w), &device)?;
            let weight = Tensor::randn(0f32, 0.3, (cout, cin, k, k), &device)?;
            let bias = with_bias.then(|| Tensor::randn(0f32, 1.0, cout, &device)).transpose()?;
            let config = Conv2dConfig { padding, stride, ..Default::default() };
            let reference = candle_nn::Conv2d::new(weight, bias, config);
            let ours = Conv2d::new(reference.clone());
            let fast = ours.forward_cpu_f32(&x)?.expect("kernel path taken");
            let slow = reference.forward(&x)?;
            assert_eq!(fast.dims(), slow.dims());
            let diff = max_abs_diff(&fast, &slow);
            assert!(diff < 1e-4, "conv {batch}x{cin}x{h}x{w} k{k} s{stride} p{padding}: {diff}");
            // A non-contiguous input takes the same path and gives the same result.
            let transposed = x.transpose(2, 3)?.contiguous()?.transpose(2, 3)?;
            assert!(max_abs_diff(&ours.forward(&transposed)?, &slow) < 1e-4);
        }
        Ok(())
    }

    /// Layers built around the same weight tensor (as a LoRA request's rebuilt networks are
    /// for the layers its LoRAs leave alone) share one Winograd transform; a new tensor
    /// gets its own.
    #[test]
    fn winograd_weights_are_shared_by_tensor() -> Result<()> {
        if !kernels_enabled() || winograd_mode() == WinogradMode::Off {
            return Ok(()); // switched off by the environment: nothing to share
        }
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 0.3, (36, 40, 3, 3), &device)?;
        let config = Conv2dConfig { padding: 1, ..Default::default() };
        let x = Tensor::randn(0f32, 1.0, (1, 40, 16, 16), &device)?;
        let layer = |weight: &Tensor| {
            let layer = Conv2d::new(candle_nn::Conv2d::new(weight.clone(), None, config));
            layer.forward(&x).map(|_| layer)
        };
        let (first, second) = (layer(&weight)?, layer(&weight)?);
        let transformed = |layer: &Conv2d| layer.winograd.get().cloned().expect("Winograd ran");
        assert!(Arc::ptr_eq(&transformed(&first), &transformed(&second)));
        let other = layer(&(weight + 1.0)?)?;
        assert!(!Arc::ptr_eq(&transformed(&first), &transformed(&other)));
        Ok(())
    }

    #[test]
    fn group_norm_matches_candle_with_and_without_silu() -> Result<()> {
        let device = Device::Cpu;
        for (batch, channels, h, w, groups) in [(2, 8, 5, 7, 4), (1, 32, 9, 9, 32), (1, 6, 1, 3, 2)]
        {
            let x = (Tensor::randn(0f32, 2.0, (batch, channels, h, w), &device)? + 0.5)?;
            let weight = Tensor::randn(1f32, 0.2, channels, &device)?;
            let bias = Tensor::randn(0f32, 0.2, channels, &device)?;
            let reference =
                candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, 1e-6)?;
            let ours = GroupNorm { inner: reference.clone(), weight, bias, groups, eps: 1e-6 };
            let want = reference.forward(&x)?;
            let fast = ours.forward_cpu_f32(&x, false)?.expect("kernel path taken");
            assert!(max_abs_diff(&fast, &want) < 1e-5);
            let want_silu = candle_nn::ops::silu(&want)?;
            assert!(max_abs_diff(&ours.forward_silu(&x)?, &want_silu) < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn blocked_attention_matches_split_heads_and_matmuls() -> Result<()> {
        use crate::models::common::{merge_heads, scaled_dot_product_attention, split_heads};
        let device = Device::Cpu;
        let (batch, heads, tokens, key_tokens, head_dim) = (2, 3, 70, 19, 8);
        let width = heads * head_dim;
        let q = Tensor::randn(0f32, 1.0, (batch, tokens, width), &device)?;
        let k = Tensor::randn(0f32, 1.0, (batch, key_tokens, width), &device)?;
        let v = Tensor::randn(0f32, 1.0, (batch, key_tokens, width), &device)?;
        let (k2, v2) = (k.affine(0.5, 0.1)?, v.affine(-1.0, 0.3)?);
        let by_heads = |k: &Tensor, v: &Tensor| -> Result<Tensor> {
            let (qh, kh, vh) =
                (split_heads(&q, heads)?, split_heads(k, heads)?, split_heads(v, heads)?);
            merge_heads(&scaled_dot_product_attention(&qh, &kh, &vh, None, false)?)
        };
        let expected = (by_heads(&k, &v)? + (by_heads(&k2, &v2)? * 0.6)?)?;
        let got = blocked_attention(&q, &k, &v, heads, &[(k2, v2, 0.6)])?
            .expect("f32 CPU tensors take the kernel");
        assert!(max_abs_diff(&expected, &got) < 1e-5);
        // A key/value batch that does not match the queries is left to candle.
        let lone = k.narrow(0, 0, 1)?;
        assert!(blocked_attention(&q, &lone, &lone, heads, &[])?.is_none());
        Ok(())
    }

    #[test]
    fn non_f32_tensors_fall_back_to_candle() -> Result<()> {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 0.3, (3, 2, 3, 3), &device)?.to_dtype(DType::F16)?;
        let config = Conv2dConfig { padding: 1, ..Default::default() };
        let conv = Conv2d::new(candle_nn::Conv2d::new(weight, None, config));
        let x = Tensor::randn(0f32, 1.0, (1, 2, 4, 4), &device)?.to_dtype(DType::F16)?;
        assert!(conv.forward_cpu_f32(&x)?.is_none());
        assert_eq!(conv.forward(&x)?.dims(), [1, 3, 4, 4]);
        Ok(())
    }
}
