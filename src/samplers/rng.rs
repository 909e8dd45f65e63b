//! A CPU random generator that reproduces torch's `torch.Generator("cpu")` + `torch.randn`
//! (float32) bit for bit, so a seed gives the same latents as diffusers.
//! See `shared/reference/torch-cpu-randn.md` for the algorithm.
//!
//! The block transform follows torch's AVX2 kernel (what every x86-64 CPU with AVX2 runs,
//! AVX-512 ones included), whose float32 Cephes log/sincos sequence is reproduced here with
//! `f32::mul_add` at the exact places the compiled torch kernel fuses. torch on CPUs without
//! AVX2 (aarch64, Apple Silicon) uses libm instead and differs in the last bit of ~1 % of values.

use candle_core::{Device, Result, Shape, Tensor};

/// torch's CPU generator: mt19937 plus torch's normal transforms.
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Box<Mt19937>,
    /// The second value of the serial (small tensor) Box–Muller pair, kept across calls
    /// exactly as torch keeps `next_double_normal_sample`.
    cached_normal: Option<f64>,
}

/// Below this many elements torch uses the serial double-precision Box–Muller.
const BLOCK: usize = 16;
const HALF_BLOCK: usize = BLOCK / 2;

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    ///
    /// torch keeps the full 64-bit seed but initialises mt19937 from its low 32 bits only.
    pub fn new(seed: u64) -> Self {
        TorchGenerator { engine: Box::new(Mt19937::new(seed as u32)), cached_normal: None }
    }

    /// `torch.randn(n, generator=g, dtype=torch.float32)`, as a flat vector.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < BLOCK {
            (0..n).map(|_| self.serial_normal() as f32).collect()
        } else {
            self.block_normals(n)
        }
    }

    /// `torch.randn(shape, generator=g, dtype=torch.float32)` placed on `device`.
    pub fn randn_tensor<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let values = self.randn(shape.elem_count());
        Tensor::from_vec(values, shape, device)
    }

    /// One float32 uniform in [0, 1): the low 24 bits of one draw.
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00FF_FFFF) as f32 * (1.0 / 16_777_216.0)
    }

    /// One float64 uniform in [0, 1): the low 53 bits of two draws (the first is high).
    fn uniform_f64(&mut self) -> f64 {
        let high = self.engine.next_u32() as u64;
        let low = self.engine.next_u32() as u64;
        (((high << 32) | low) & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// torch's serial path (tensors under 16 elements): double Box–Muller, one value out,
    /// the sine partner cached for the next element (of this or a later call).
    fn serial_normal(&mut self) -> f64 {
        if let Some(cached) = self.cached_normal.take() {
            return cached;
        }
        let angle_uniform = self.uniform_f64();
        let radius_uniform = self.uniform_f64();
        let radius = (-2.0 * (-radius_uniform).ln_1p()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * angle_uniform;
        self.cached_normal = Some(radius * angle.sin());
        radius * angle.cos()
    }

    /// torch's block path (16 elements or more): uniforms for every element, Box–Muller on
    /// each full block of 16, and a tail handled by redrawing and transforming the last 16.
    fn block_normals(&mut self, n: usize) -> Vec<f32> {
        let mut values: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in values.chunks_exact_mut(BLOCK) {
            box_muller_block(block);
        }
        if !n.is_multiple_of(BLOCK) {
            let tail = &mut values[n - BLOCK..];
            for slot in tail.iter_mut() {
                *slot = self.uniform_f32();
            }
            box_muller_block(tail);
        }
        values
    }
}

/// Turns 16 uniforms into 16 normals in place: element j pairs with j + 8.
fn box_muller_block(block: &mut [f32]) {
    debug_assert_eq!(block.len(), BLOCK, "a Box-Muller block has 16 values; this is a bug");
    for j in 0..HALF_BLOCK {
        let radius_uniform = 1.0 - block[j];
        let angle_uniform = block[j + HALF_BLOCK];
        let radius = (-2.0 * cephes_ln(radius_uniform)).sqrt();
        let angle = 6.283_185_5_f32 * angle_uniform;
        let (sin, cos) = cephes_sincos(angle);
        // torch finishes with `normal * std + mean` (std 1, mean 0), which turns -0.0 into +0.0.
        block[j] = radius * cos + 0.0;
        block[j + HALF_BLOCK] = radius * sin + 0.0;
    }
}

/// Natural log of x in (0, 1], float32 Cephes `logf` with torch's AVX2 FMA placement.
fn cephes_ln(x: f32) -> f32 {
    const SQRT_HALF: f32 = 0.707_106_77;
    const POLY: [f32; 9] = [
        7.037_683_6e-2,
        -1.151_461e-1,
        1.167_699_84e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_4e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ];
    const Q1: f32 = -2.121_944_4e-4;
    const Q2: f32 = 0.693_359_4;

    let bits = x.to_bits();
    let biased_exponent = ((bits >> 23) & 0xFF) as i32;
    let mantissa = f32::from_bits((bits & !0x7F80_0000) | 0x3F00_0000);
    let mut exponent = (biased_exponent - 127) as f32 + 1.0;
    let t = if mantissa < SQRT_HALF {
        exponent -= 1.0;
        (mantissa - 1.0) + mantissa
    } else {
        (mantissa - 1.0) + 0.0
    };
    let z = t * t;
    let mut y = POLY[0];
    for &coefficient in &POLY[1..] {
        y = y.mul_add(t, coefficient);
    }
    y *= t;
    y = y.mul_add(z, exponent * Q1);
    y = (-z).mul_add(0.5, y);
    exponent.mul_add(Q2, t + y)
}

/// (sin θ, cos θ) for θ in [0, 2π), float32 Cephes `sincosf` with torch's AVX2 FMA placement.
fn cephes_sincos(theta: f32) -> (f32, f32) {
    const FOUR_OVER_PI: f32 = 1.273_239_5;
    const REDUCE: [f32; 3] = [-0.785_156_25, -2.418_756_5e-4, -3.774_895e-8];
    const COS_POLY: [f32; 3] = [2.443_315_7e-5, -1.388_731_6e-3, 4.166_664_6e-2];
    const SIN_POLY: [f32; 3] = [-1.951_529_6e-4, 8.332_161e-3, -1.666_665_5e-1];
    const SIGN: u32 = 0x8000_0000;

    let octant = (((theta * FOUR_OVER_PI) as i32).wrapping_add(1)) & !1;
    let octant_f = octant as f32;
    let mut x = octant_f.mul_add(REDUCE[0], theta);
    x = octant_f.mul_add(REDUCE[1], x);
    x = octant_f.mul_add(REDUCE[2], x);
    let z = x * x;

    let mut cos_poly = COS_POLY[0].mul_add(z, COS_POLY[1]);
    cos_poly = cos_poly.mul_add(z, COS_POLY[2]);
    cos_poly *= z;
    cos_poly = cos_poly.mul_add(z, -(z * 0.5));
    cos_poly += 1.0;

    let mut sin_poly = SIN_POLY[0].mul_add(z, SIN_POLY[1]);
    sin_poly = sin_poly.mul_add(z, SIN_POLY[2]);
    sin_poly *= z;
    sin_poly = sin_poly.mul_add(x, x);

    // The kernel selects with masks and additions of +0.0, so a -0.0 becomes +0.0 here.
    let (sin, cos) = if octant & 2 == 0 {
        (sin_poly + 0.0, cos_poly + 0.0)
    } else {
        (cos_poly + 0.0, sin_poly + 0.0)
    };
    let sin_sign = if octant & 4 != 0 { SIGN } else { 0 };
    let cos_sign = if octant.wrapping_sub(2) & 4 == 0 { SIGN } else { 0 };
    (f32::from_bits(sin.to_bits() ^ sin_sign), f32::from_bits(cos.to_bits() ^ cos_sign))
}

/// The 32-bit Mersenne Twister as torch (and `std::mt19937`) runs it.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; Mt19937::N],
    /// Next state word to temper; `N` means the block must be regenerated first.
    index: usize,
}

impl Mt19937 {
    const N: usize = 624;
    const M: usize = 397;
    const MATRIX_A: u32 = 0x9908_B0DF;
    const UPPER_MASK: u32 = 0x8000_0000;
    const LOWER_MASK: u32 = 0x7FFF_FFFF;

    fn new(seed: u32) -> Self {
        let mut state = [0u32; Self::N];
        state[0] = seed;
        for j in 1..Self::N {
            let previous = state[j - 1];
            state[j] =
                1_812_433_253u32.wrapping_mul(previous ^ (previous >> 30)).wrapping_add(j as u32);
        }
        Mt19937 { state, index: Self::N }
    }

    fn twist(&mut self) {
        for i in 0..Self::N {
            let y = (self.state[i] & Self::UPPER_MASK)
                | (self.state[(i + 1) % Self::N] & Self::LOWER_MASK);
            let mag = if y & 1 == 0 { 0 } else { Self::MATRIX_A };
            self.state[i] = self.state[(i + Self::M) % Self::N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= Self::N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9D2C_5680;
        y ^= (y << 15) & 0xEFC6_0000;
        y ^= y >> 18;
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Vectors {
        cases: Vec<Case>,
    }

    #[derive(Deserialize)]
    struct Case {
        seed: u64,
        calls: Vec<Call>,
    }

    #[derive(Deserialize)]
    struct Call {
        n: usize,
        bits: Option<Vec<u32>>,
        first_bits: Option<Vec<u32>>,
        last_bits: Option<Vec<u32>>,
        fnv1a64: Option<String>,
    }

    fn fnv1a64(values: &[f32]) -> u64 {
        let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
        for byte in values.iter().flat_map(|v| v.to_le_bytes()) {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
        }
        hash
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn mt19937_matches_the_reference_first_output() {
        // The classic mt19937 check value: default seed 5489 gives 3499211612 first.
        assert_eq!(Mt19937::new(5489).next_u32(), 3_499_211_612);
    }

    /// Exact bit equality with torch on every stored call (tolerance: none).
    #[test]
    fn randn_matches_torch_bit_for_bit() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rng/vectors.json");
        let text = std::fs::read_to_string(path).expect("read rng fixture");
        let vectors: Vectors = serde_json::from_str(&text).expect("parse rng fixture");
        assert!(!vectors.cases.is_empty());
        for case in &vectors.cases {
            let mut generator = TorchGenerator::new(case.seed);
            for (call_index, call) in case.calls.iter().enumerate() {
                let values = generator.randn(call.n);
                let context = format!("seed {} call {call_index} n {}", case.seed, call.n);
                assert_eq!(values.len(), call.n, "{context}");
                if let Some(expected) = &call.bits {
                    assert_eq!(&bits(&values), expected, "{context}");
                } else {
                    let first = call.first_bits.as_ref().expect("first_bits");
                    let last = call.last_bits.as_ref().expect("last_bits");
                    assert_eq!(&bits(&values[..first.len()]), first, "{context}");
                    assert_eq!(&bits(&values[values.len() - last.len()..]), last, "{context}");
                    let hash = format!("{:016x}", fnv1a64(&values));
                    assert_eq!(Some(&hash), call.fnv1a64.as_ref(), "{context}");
                }
            }
        }
    }

    #[test]
    fn seed_uses_low_32_bits_and_tensor_has_shape() {
        let mut a = TorchGenerator::new(5);
        let mut b = TorchGenerator::new((1u64 << 32) + 5);
        assert_eq!(bits(&a.randn(40)), bits(&b.randn(40)));
        let t = a.randn_tensor((1, 4, 3, 5), &Device::Cpu).expect("tensor");
        assert_eq!(t.dims(), &[1, 4, 3, 5]);
    }

    #[test]
    fn generator_is_clone_and_send() {
        fn assert_send<T: Send + Clone>() {}
        assert_send::<TorchGenerator>();
    }
}
