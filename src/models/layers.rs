//! Convolution, group-norm, linear and layer-norm layers (plus GEGLU, the transformer's
//! per-pixel projections and multi-head attention) that run sdserve's own f32 CPU kernels
//! (`sdserve-cpu-kernels`) when the tensors allow it and candle's ops otherwise (GPU, f16,
//! bf16, grouped or dilated convolutions), with the same weights and results.

use candle_core::{DType, Module, Result, Storage, StorageRef, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use sdserve_cpu_kernels::bf16::{packed_weight_pays, PackedLhs, PackedRhs};
use sdserve_cpu_kernels::winograd::{self, WinogradVariant, WinogradWeight};
use sdserve_cpu_kernels::{Conv2dGeometry, MatmulPrecision, MatrixRef};
use std::sync::{Arc, OnceLock};

use super::profile::{self, LayerKind};

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
/// each call unless `RAYON_NUM_THREADS` is set). Every kernel call asks for it, so it also
/// settles the products' precision before the first one (see [`cpu_matmul`]).
fn kernel_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    cpu_matmul();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// Settled once the products' precision was set or read from the environment.
static CPU_MATMUL_SETTLED: std::sync::Once = std::sync::Once::new();

/// Precision of the CPU kernels' matrix products (convolutions, linear layers, projections,
/// attention): [`set_cpu_matmul`] if it came first, else `SDSERVE_CPU_MATMUL` (`f32`, the
/// default, or `bf16`) read on first use. bf16 rounds the products' operands to bf16 and
/// accumulates in f32 (AVX512-BF16 CPUs only; elsewhere it stays f32); every tensor between
/// layers stays f32.
pub fn cpu_matmul() -> MatmulPrecision {
    CPU_MATMUL_SETTLED.call_once(|| {
        if std::env::var("SDSERVE_CPU_MATMUL").as_deref() == Ok("bf16") {
            sdserve_cpu_kernels::set_matmul_precision(MatmulPrecision::Bf16);
        }
    });
    sdserve_cpu_kernels::matmul_precision()
}

/// Sets the precision of the CPU kernels' products for the whole process (the `--cpu-matmul`
/// option) and returns the one in effect: bf16 needs AVX512-BF16, else f32 stays. Call it
/// before the first generation; `SDSERVE_CPU_MATMUL` is then not read.
pub fn set_cpu_matmul(precision: MatmulPrecision) -> MatmulPrecision {
    CPU_MATMUL_SETTLED.call_once(|| {});
    sdserve_cpu_kernels::set_matmul_precision(precision)
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
    /// The weight as an `out × in·kh·kw` matrix packed for bf16 products, made on the first
    /// im2col call in bf16 mode (half the weight's memory); shared like `winograd`.
    packed_bf16: Arc<OnceLock<Arc<PackedLhs>>>,
}

/// Values derived from a weight tensor (its Winograd transform, its bf16 packing) by the id
/// of that tensor and their type, so that layers rebuilt around the same tensor share them:
/// a request with LoRAs rebuilds the networks from the base tensors plus its merged copies,
/// and without this every 3×3 layer would be transformed again (≈ 0.35 CPU-s for one
/// 1280-channel layer). Entries are weak; the memory goes with the last layer holding it.
fn shared_by_tensor<T: Send + Sync + 'static>(weight: &Tensor, make: impl FnOnce() -> T) -> Arc<T> {
    type Entry = std::sync::Weak<dyn std::any::Any + Send + Sync>;
    type Registry = std::collections::HashMap<(candle_core::TensorId, std::any::TypeId), Entry>;
    static REGISTRY: OnceLock<std::sync::Mutex<Registry>> = OnceLock::new();
    let registry = REGISTRY.get_or_init(Default::default);
    let key = (weight.id(), std::any::TypeId::of::<T>());
    if let Some(shared) = registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(&key)
        .and_then(std::sync::Weak::upgrade)
        .and_then(|shared| shared.downcast::<T>().ok())
    {
        return shared;
    }
    // Made outside the lock; two layers racing on one tensor both make it once.
    let made = Arc::new(make());
    let mut registry = registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    registry.retain(|_, entry| entry.strong_count() > 0);
    let any: Arc<dyn std::any::Any + Send + Sync> = made.clone();
    registry.insert(key, Arc::downgrade(&any));
    made
}

impl Conv2d {
    /// Wraps candle's layer (whose forward is the fallback).
    pub fn new(inner: candle_nn::Conv2d) -> Self {
        Conv2d { inner, winograd: Arc::default(), packed_bf16: Arc::default() }
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
        let transformed = variant.map(|variant| {
            self.winograd.get_or_init(|| {
                shared_by_tensor(self.inner.weight(), || {
                    WinogradWeight::new(weight_values, out_channels, in_channels, variant)
                })
            })
        });
        let bf16_pays = cpu_matmul() == MatmulPrecision::Bf16 && packed_weight_pays(out_channels);
        let packed = (transformed.is_none() && bf16_pays).then(|| {
            self.packed_bf16.get_or_init(|| {
                shared_by_tensor(self.inner.weight(), || {
                    let depth = in_channels * kh * kw;
                    let matrix =
                        MatrixRef { data: weight_values, row_stride: depth, col_stride: 1 };
                    PackedLhs::new(matrix, out_channels, depth, threads)
                })
            })
        });
        let input_values = input.values()?;
        let image_len = in_channels * height * width;
        let one_image = Conv2dGeometry { batch: 1, ..geometry };
        let kind =
            if transformed.is_some() { LayerKind::ConvWinograd } else { LayerKind::ConvIm2col };
        let flops = 2 * (batch * out_channels * out_h * out_w * in_channels * kh * kw) as u64;
        let output = profile::timed(kind, flops, || {
            sdserve_cpu_kernels::per_item(batch, threads, |item, threads| {
                let image = &input_values[item * image_len..(item + 1) * image_len];
                match transformed {
                    Some(transformed) => winograd::conv2d_3x3(
                        image,
                        transformed,
                        bias_values,
                        1,
                        height,
                        width,
                        threads,
                    ),
                    None => sdserve_cpu_kernels::conv2d_with_packed(
                        image,
                        weight_values,
                        packed.map(|packed| packed.as_ref()),
                        bias_values,
                        &one_image,
                        threads,
                    ),
                }
            })
        });
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
        let (input, gamma, beta) = (input.values()?, gamma.values()?, beta.values()?);
        let output = profile::timed(LayerKind::GroupNorm, 0, || {
            sdserve_cpu_kernels::group_norm(
                input,
                batch,
                channels,
                spatial,
                self.groups,
                self.eps as f32,
                gamma,
                beta,
                silu,
            )
        });
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
    let (q_values, k_values, v_values) = (q.values()?, k.values()?, v.values()?);
    let mut output = profile::timed(LayerKind::Attention, attention_flops(key_tokens), || {
        sdserve_cpu_kernels::attention(
            q_values,
            k_values,
            v_values,
            &geometry(key_tokens),
            scale,
            threads,
        )
    });
    for (extra_key, extra_value, weight) in extras {
        let (extra_key, extra_value) = (contiguous(extra_key)?, contiguous(extra_value)?);
        let (Some(ek), Some(ev)) = (CpuF32::of(&extra_key), CpuF32::of(&extra_value)) else {
            return Ok(None);
        };
        let extra_tokens = extra_key.dim(1)?;
        add_flops(attention_flops(extra_tokens));
        let (ek_values, ev_values) = (ek.values()?, ev.values()?);
        profile::timed(LayerKind::Attention, attention_flops(extra_tokens), || {
            sdserve_cpu_kernels::attention_into(
                &mut output,
                1.0,
                q_values,
                ek_values,
                ev_values,
                &geometry(extra_tokens),
                scale,
                *weight,
                threads,
            )
        });
    }
    Tensor::from_vec(output, (batch, query_tokens, width), query.device()).map(Some)
}

/// `tensor` made contiguous when it is an f32 CPU tensor and the kernels are on; `None`
/// hands over to candle.
fn contiguous_cpu_f32(tensor: &Tensor) -> Result<Option<Tensor>> {
    if is_cpu_f32(tensor) {
        tensor.contiguous().map(Some)
    } else {
        Ok(None)
    }
}

/// [`contiguous_cpu_f32`] of an optional tensor: `Some(None)` when absent, `None` when
/// present but not usable by the kernels.
fn optional_cpu_f32(tensor: Option<&Tensor>) -> Result<Option<Option<Tensor>>> {
    match tensor {
        None => Ok(Some(None)),
        Some(tensor) => Ok(contiguous_cpu_f32(tensor)?.map(Some)),
    }
}

/// The values of a tensor [`contiguous_cpu_f32`] returned (always a contiguous f32 CPU one).
fn values_of(tensor: &Tensor) -> Result<CpuF32<'_>> {
    CpuF32::of(tensor).ok_or_else(|| {
        candle_core::Error::Msg("kernel input is not contiguous f32 on CPU: this is a bug".into())
    })
}

/// A linear layer (`weight [out, in]`, optional bias), torch semantics: `x · weightᵀ + bias`
/// over the last dimension. On CPU f32 it is one product per leading batch item with the
/// bias pre-filled into the output and the weight read in place.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    /// `weightᵀ` packed for bf16 products, made on the first call in bf16 mode; shared by
    /// clones and by layers over the same tensor (see [`shared_by_tensor`]).
    packed_bf16: Arc<OnceLock<Arc<PackedRhs>>>,
}

impl Linear {
    /// A layer over `weight` (`[out, in]`) and `bias` (`[out]`).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { inner: candle_nn::Linear::new(weight, bias), packed_bf16: Arc::default() }
    }

    /// The weight tensor `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// `self.forward(x) + residual` (same shapes); on the kernel path the residual is
    /// pre-filled into the product's output instead of added in a second pass.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.count_flops(x);
        match self.forward_cpu_f32(x, Some(residual))? {
            Some(output) => Ok(output),
            None => self.inner.forward(&x.contiguous()?)? + residual,
        }
    }

    /// Adds this layer's 2 · rows · in · out operations on `x` to the process-wide count.
    fn count_flops(&self, x: &Tensor) {
        add_flops(2 * (x.elem_count() * self.weight().dim(0).unwrap_or(0)) as u64);
    }

    fn forward_cpu_f32(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Option<Tensor>> {
        let Ok((out_features, in_features)) = self.weight().dims2() else {
            return Ok(None);
        };
        let dims = x.dims();
        if dims.last() != Some(&in_features) {
            return Ok(None);
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank checked above") = out_features;
        // One product per item of the first dimension keeps an item's rounding independent
        // of how many items are batched with it.
        let (batch, rows) = match dims.len() {
            1 => (1, 1),
            2 => (1, dims[0]),
            _ => (dims[0], dims[1..dims.len() - 1].iter().product()),
        };
        if residual.is_some_and(|r| r.dims() != out_dims.as_slice()) {
            return Ok(None);
        }
        let (Some(x), Some(weight), Some(bias), Some(residual)) = (
            contiguous_cpu_f32(x)?,
            contiguous_cpu_f32(self.weight())?,
            optional_cpu_f32(self.bias())?,
            optional_cpu_f32(residual)?,
        ) else {
            return Ok(None);
        };
        let (input, weight_values) = (values_of(&x)?, values_of(&weight)?);
        let bias = bias.as_ref().map(values_of).transpose()?;
        let residual = residual.as_ref().map(values_of).transpose()?;
        let weight_values = weight_values.values()?;
        let bf16_pays = cpu_matmul() == MatmulPrecision::Bf16 && packed_weight_pays(rows);
        let packed = bf16_pays.then(|| {
            self.packed_bf16.get_or_init(|| {
                shared_by_tensor(self.weight(), || {
                    // weightᵀ (in × out) read in place through strides.
                    let transposed =
                        MatrixRef { data: weight_values, row_stride: 1, col_stride: in_features };
                    PackedRhs::new(transposed, in_features, out_features, kernel_threads())
                })
            })
        });
        let input = input.values()?;
        let bias = bias.as_ref().map(CpuF32::values).transpose()?;
        let residual = residual.as_ref().map(CpuF32::values).transpose()?;
        let flops = 2 * (batch * rows * in_features * out_features) as u64;
        let output = profile::timed(LayerKind::Linear, flops, || {
            sdserve_cpu_kernels::linear_with_packed(
                input,
                batch,
                rows,
                in_features,
                weight_values,
                packed.map(|packed| packed.as_ref()),
                bias,
                residual,
                kernel_threads(),
            )
        });
        Tensor::from_vec(output, out_dims, x.device()).map(Some)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.count_flops(x);
        match self.forward_cpu_f32(x, None)? {
            Some(output) => Ok(output),
            // candle_nn's linear mis-reads some strided inputs in candle 0.11 (see
            // `linear_matches_candle`); `contiguous` costs nothing when already so.
            None => self.inner.forward(&x.contiguous()?),
        }
    }
}

/// A linear layer loaded from `vb` (`weight`, `bias`), as `candle_nn::linear`.
pub fn linear(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Linear> {
    let inner = candle_nn::linear(in_features, out_features, vb)?;
    Ok(Linear { inner, packed_bf16: Arc::default() })
}

/// A linear layer without bias loaded from `vb` (`weight`), as `candle_nn::linear_no_bias`.
pub fn linear_no_bias(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Linear> {
    let inner = candle_nn::linear_no_bias(in_features, out_features, vb)?;
    Ok(Linear { inner, packed_bf16: Arc::default() })
}

/// torch's `LayerNorm` over the last dimension (with affine weight and bias).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
}

impl LayerNorm {
    fn forward_cpu_f32(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let inner = &self.inner;
        if !inner.remove_mean() || x.dims().last() != Some(&inner.weight().elem_count()) {
            return Ok(None);
        }
        let (Some(x), Some(gamma), Some(beta)) = (
            contiguous_cpu_f32(x)?,
            contiguous_cpu_f32(inner.weight())?,
            optional_cpu_f32(inner.bias())?,
        ) else {
            return Ok(None);
        };
        let (input, gamma) = (values_of(&x)?, values_of(&gamma)?);
        let beta = beta.as_ref().map(values_of).transpose()?;
        let (input, gamma) = (input.values()?, gamma.values()?);
        let beta = beta.as_ref().map(CpuF32::values).transpose()?;
        let output = profile::timed(LayerKind::LayerNorm, 0, || {
            sdserve_cpu_kernels::layer_norm(input, gamma, beta, inner.eps() as f32)
        });
        Tensor::from_vec(output, x.dims(), x.device()).map(Some)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.forward_cpu_f32(x)? {
            Some(output) => Ok(output),
            None => self.inner.forward(x),
        }
    }
}

/// A layer norm loaded from `vb` (`weight`, `bias`), as `candle_nn::layer_norm`.
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm { inner: candle_nn::layer_norm(size, eps, vb)? })
}

/// diffusers' `GEGLU` after its projection: the last dimension of `projected` is a hidden
/// half then a gate half; the result is `hidden · gelu_erf(gate)` (exact GELU).
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    let width = projected.dim(candle_core::D::Minus1)?;
    let half = width / 2;
    if let (Some(contiguous), true) = (contiguous_cpu_f32(projected)?, half > 0 && width % 2 == 0) {
        let values = values_of(&contiguous)?;
        let values = values.values()?;
        let output =
            profile::timed(LayerKind::Geglu, 0, || sdserve_cpu_kernels::geglu(values, half));
        let mut dims = projected.dims().to_vec();
        *dims.last_mut().expect("a dimension was read above") = half;
        return Tensor::from_vec(output, dims, projected.device());
    }
    let hidden = projected.narrow(candle_core::D::Minus1, 0, half)?;
    let gate = projected.narrow(candle_core::D::Minus1, half, half)?;
    hidden * gate.gelu_erf()?
}

/// A per-pixel projection's weight as `[out, in]` values (a linear weight or a 1×1
/// convolution's `[out, in, 1, 1]`), with its bias; `None` when the kernels cannot run.
#[allow(clippy::type_complexity)]
fn pixel_projection(
    weight: &Tensor,
    bias: Option<&Tensor>,
    in_channels: usize,
) -> Result<Option<(usize, Tensor, Option<Tensor>)>> {
    let out_channels = weight.dim(0)?;
    if weight.elem_count() != out_channels * in_channels
        || bias.is_some_and(|b| b.dims() != [out_channels])
    {
        return Ok(None);
    }
    let (Some(weight), Some(bias)) = (contiguous_cpu_f32(weight)?, optional_cpu_f32(bias)?) else {
        return Ok(None);
    };
    Ok(Some((out_channels, weight, bias)))
}

/// An NCHW image `x` through a per-pixel projection (`weight` `[out, in]` or
/// `[out, in, 1, 1]`, `bias` `[out]`) straight into tokens `[batch, h·w, out]`: the
/// transformer's `proj_in` with its permute folded into the product's strides. `None`
/// when the kernels cannot run (the caller falls back to candle's ops).
pub fn project_pixels_to_tokens(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let Ok((batch, channels, height, width)) = x.dims4() else {
        return Ok(None);
    };
    let (Some((out_channels, weight, bias)), Some(x)) =
        (pixel_projection(weight, bias, channels)?, contiguous_cpu_f32(x)?)
    else {
        return Ok(None);
    };
    let bias = bias.as_ref().map(values_of).transpose()?;
    let (input, weight_view) = (values_of(&x)?, values_of(&weight)?);
    let (input, weight_values) = (input.values()?, weight_view.values()?);
    let bias = bias.as_ref().map(CpuF32::values).transpose()?;
    let flops = 2 * (x.elem_count() * out_channels) as u64;
    let output = profile::timed(LayerKind::Linear, flops, || {
        sdserve_cpu_kernels::pixels_to_tokens(
            input,
            batch,
            height * width,
            weight_values,
            bias,
            kernel_threads(),
        )
    });
    add_flops(flops);
    Tensor::from_vec(output, (batch, height * width, out_channels), x.device()).map(Some)
}

/// Tokens `[batch, h·w, in]` through a per-pixel projection (as in
/// [`project_pixels_to_tokens`]) straight into an NCHW image plus `residual`
/// (`[batch, out, h, w]`, which also gives the image's size): the transformer's `proj_out`
/// and residual add in one product. `None` when the kernels cannot run.
pub fn project_tokens_to_pixels_add(
    tokens: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Option<Tensor>> {
    let (Ok((batch, pixels, channels)), Ok((res_batch, res_channels, height, width))) =
        (tokens.dims3(), residual.dims4())
    else {
        return Ok(None);
    };
    if res_batch != batch || height * width != pixels {
        return Ok(None);
    }
    let (Some((out_channels, weight, bias)), Some(tokens), Some(residual)) = (
        pixel_projection(weight, bias, channels)?,
        contiguous_cpu_f32(tokens)?,
        contiguous_cpu_f32(residual)?,
    ) else {
        return Ok(None);
    };
    if out_channels != res_channels {
        return Ok(None);
    }
    let bias = bias.as_ref().map(values_of).transpose()?;
    let (input, weight_view, residual_view) =
        (values_of(&tokens)?, values_of(&weight)?, values_of(&residual)?);
    let (input, weight_values) = (input.values()?, weight_view.values()?);
    let (bias, residual_values) =
        (bias.as_ref().map(CpuF32::values).transpose()?, residual_view.values()?);
    let flops = 2 * (tokens.elem_count() * out_channels) as u64;
    let output = profile::timed(LayerKind::Linear, flops, || {
        sdserve_cpu_kernels::tokens_to_pixels(
            input,
            batch,
            pixels,
            weight_values,
            bias,
            Some(residual_values),
            kernel_threads(),
        )
    });
    add_flops(flops);
    Tensor::from_vec(output, residual.dims(), residual.device()).map(Some)
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

    /// The linear layer against candle's on 2-D and 3-D inputs, with and without bias,
    /// with a residual, and on a non-contiguous input.
    #[test]
    fn linear_matches_candle() -> Result<()> {
        let device = Device::Cpu;
        for (dims, inputs, outputs, with_bias) in [
            (vec![2, 70, 24], 24, 80, true),
            (vec![3, 24], 24, 5, false),
            (vec![1, 2, 3, 9], 9, 7, true),
        ] {
            let x = Tensor::randn(0f32, 1.0, dims.as_slice(), &device)?;
            let weight = Tensor::randn(0f32, 0.3, (outputs, inputs), &device)?;
            let bias = with_bias.then(|| Tensor::randn(0f32, 1.0, outputs, &device)).transpose()?;
            let reference = candle_nn::Linear::new(weight.clone(), bias.clone());
            let ours = Linear::new(weight, bias);
            let want = reference.forward(&x)?;
            let fast = ours.forward_cpu_f32(&x, None)?.expect("kernel path taken");
            assert_eq!(fast.dims(), want.dims());
            assert!(max_abs_diff(&fast, &want) < 1e-5);
            let residual = Tensor::randn(0f32, 1.0, want.dims(), &device)?;
            assert!(max_abs_diff(&ours.forward_add(&x, &residual)?, &(&want + &residual)?) < 1e-5);
        }
        // A transposed input is made contiguous first (compared with candle on the
        // contiguous copy: candle_nn::Linear gives a different, wrong-looking result on this
        // strided layout in candle 0.11).
        let x = Tensor::randn(0f32, 1.0, (2, 6, 5), &device)?.transpose(1, 2)?;
        let weight = Tensor::randn(0f32, 0.3, (4, 6), &device)?;
        let want = candle_nn::Linear::new(weight.clone(), None).forward(&x.contiguous()?)?;
        assert!(max_abs_diff(&Linear::new(weight, None).forward(&x)?, &want) < 1e-5);
        Ok(())
    }

    /// The candle fallback (GPU, f16, bf16, kernels off) gives a strided input the same
    /// result as its contiguous copy.
    #[test]
    fn linear_fallback_reads_strided_inputs() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 6, 5), &device)?.transpose(1, 2)?;
        let weight = Tensor::randn(0f32, 0.3, (4, 6), &device)?;
        let bias = Tensor::randn(0f32, 1.0, 4, &device)?;
        let layer = Linear::new(weight.to_dtype(DType::F16)?, Some(bias.to_dtype(DType::F16)?));
        let strided = layer.forward(&x.to_dtype(DType::F16)?)?.to_dtype(DType::F32)?;
        let contiguous =
            layer.forward(&x.contiguous()?.to_dtype(DType::F16)?)?.to_dtype(DType::F32)?;
        assert_eq!(max_abs_diff(&strided, &contiguous), 0.0);
        let residual = Tensor::zeros((2, 5, 4), DType::F16, &device)?;
        let added = layer.forward_add(&x.to_dtype(DType::F16)?, &residual)?;
        assert_eq!(max_abs_diff(&added.to_dtype(DType::F32)?, &contiguous), 0.0);
        Ok(())
    }

    #[test]
    fn layer_norm_and_geglu_match_candle() -> Result<()> {
        let device = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (2, 9, 40), &device)? + 0.7)?;
        let vb = VarBuilder::from_tensors(
            [
                ("weight".to_string(), Tensor::randn(1f32, 0.2, 40, &device)?),
                ("bias".to_string(), Tensor::randn(0f32, 0.2, 40, &device)?),
            ]
            .into_iter()
            .collect(),
            DType::F32,
            &device,
        );
        let reference = candle_nn::layer_norm(40, 1e-5, vb.clone())?;
        let ours = layer_norm(40, 1e-5, vb)?;
        let fast = ours.forward_cpu_f32(&x)?.expect("kernel path taken");
        assert!(max_abs_diff(&fast, &reference.forward(&x)?) < 1e-5);

        let projected = Tensor::randn(0f32, 3.0, (2, 9, 40), &device)?;
        let want = (projected.narrow(2, 0, 20)? * projected.narrow(2, 20, 20)?.gelu_erf()?)?;
        let got = geglu(&projected)?;
        assert_eq!(got.dims(), [2, 9, 20]);
        assert!(max_abs_diff(&got, &want) < 1e-5);
        Ok(())
    }

    /// The transformer's projections against "1×1 conv, permute" and "permute, 1×1 conv,
    /// add residual".
    #[test]
    fn pixel_projections_match_conv_and_permute() -> Result<()> {
        let device = Device::Cpu;
        let (batch, channels, h, w, out) = (2, 12, 5, 7, 9);
        let image = Tensor::randn(0f32, 1.0, (batch, channels, h, w), &device)?;
        let weight = Tensor::randn(0f32, 0.3, (out, channels, 1, 1), &device)?;
        let bias = Tensor::randn(0f32, 1.0, out, &device)?;
        let conv = candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), Default::default());
        let want = conv.forward(&image)?.permute((0, 2, 3, 1))?.reshape((batch, h * w, out))?;
        let got = project_pixels_to_tokens(&image, &weight, Some(&bias))?.expect("kernel path");
        assert!(max_abs_diff(&got, &want) < 1e-5);

        let tokens = Tensor::randn(0f32, 1.0, (batch, h * w, channels), &device)?;
        let residual = Tensor::randn(0f32, 1.0, (batch, out, h, w), &device)?;
        let as_image = tokens.reshape((batch, h, w, channels))?.permute((0, 3, 1, 2))?;
        let want = (conv.forward(&as_image.contiguous()?)? + &residual)?;
        let got = project_tokens_to_pixels_add(&tokens, &weight, Some(&bias), &residual)?
            .expect("kernel path");
        assert!(max_abs_diff(&got, &want) < 1e-5);
        // A linear weight `[out, in]` is the same projection.
        let linear_weight = weight.reshape((out, channels))?;
        let got = project_tokens_to_pixels_add(&tokens, &linear_weight, Some(&bias), &residual)?
            .expect("kernel path");
        assert!(max_abs_diff(&got, &want) < 1e-5);
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
