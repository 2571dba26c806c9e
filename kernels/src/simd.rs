//! Vector-friendly scalar math (exp, sigmoid) and a macro that compiles a loop body once per
//! x86 instruction-set level (AVX-512, AVX2+FMA, baseline) and picks one at run time, so the
//! element-wise kernels run wide without building the whole binary for one CPU.

/// Compiles `$body` for AVX-512, AVX2+FMA and the baseline target, and dispatches at run time.
/// The body must be plain safe Rust; the compiler vectorises it for each level.
#[macro_export]
#[doc(hidden)]
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2")]
                fn v4($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma,bmi2")]
                fn v3($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                match $crate::simd::level() {
                    // SAFETY: `level()` reported that this CPU supports AVX-512F/BW/VL/DQ.
                    $crate::simd::Level::V4 => return unsafe { v4($($arg),*) },
                    // SAFETY: `level()` reported that this CPU supports AVX2 and FMA.
                    $crate::simd::Level::V3 => return unsafe { v3($($arg),*) },
                    $crate::simd::Level::Base => {}
                }
            }
            body($($arg),*)
        }
    };
}

/// The widest instruction-set level this CPU supports, among those the kernels are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// AVX-512 (x86-64-v4).
    V4,
    /// AVX2 + FMA (x86-64-v3).
    V3,
    /// Whatever the target's baseline is.
    Base,
}

/// Detects (once) the level used by [`multiversion!`] functions.
pub fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let v4 = ["avx512f", "avx512bw", "avx512vl", "avx512dq"];
            let has = |f: &str| match f {
                "avx512f" => std::is_x86_feature_detected!("avx512f"),
                "avx512bw" => std::is_x86_feature_detected!("avx512bw"),
                "avx512vl" => std::is_x86_feature_detected!("avx512vl"),
                "avx512dq" => std::is_x86_feature_detected!("avx512dq"),
                _ => false,
            };
            let v3 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("bmi2");
            if v3 && v4.iter().all(|f| has(f)) {
                return Level::V4;
            }
            if v3 {
                return Level::V3;
            }
        }
        Level::Base
    })
}

const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
const LOG2E: f32 = std::f32::consts::LOG2_E;

/// e^x to about 2 ulp, written so that loops over it vectorise (no table, no branch).
/// Underflows to exactly 0 below ln(f32::MIN_POSITIVE) and saturates at f32::MAX.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.336_54, 88.722_83);
    // n = round(x / ln 2) with the 1.5·2^23 trick (round to nearest even, no libm call): after the
    // add, the low mantissa bits of `t` hold n as an integer (|n| ≤ 128 < 2^22), so n is read
    // from the bits. (A float-to-int `as` cast saturates and maps NaN to 0, which the compiler
    // cannot vectorise; this keeps the whole function in vector registers.)
    let t = xc * LOG2E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let ni = t.to_bits() as i32 - 0x4B40_0000;
    // Cody-Waite reduction: r = x − n·ln2 in two parts, |r| ≤ ln2/2.
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Minimax-style Taylor polynomial of e^r on [−ln2/2, ln2/2], degree 7 (error < 1e-8 relative).
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n: n is in [−126, 128]; split so that 2^n never overflows the exponent field.
    let half = ni >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((ni - half + 127) as u32) << 23);
    let y = p * s1 * s2;
    if x < -87.336_54 {
        0.0
    } else {
        y
    }
}

/// The logistic function 1 / (1 + e^−x), through [`exp`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
    }

    #[test]
    fn sigmoid_limits() {
        assert!(sigmoid(-200.0) < 1e-38);
        assert_eq!(sigmoid(200.0), 1.0);
        assert!((sigmoid(0.3) as f64 - 1.0 / (1.0 + (-0.3f64).exp())).abs() < 1e-7);
    }

    multiversion! {
        fn sum_exp(xs: &[f32]) -> f32 {
            xs.iter().map(|&x| exp(x)).sum()
        }
    }

    #[test]
    fn multiversion_dispatches_to_same_result() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32) * 0.01 - 5.0).collect();
        let want: f32 = xs.iter().map(|&x| exp(x)).sum();
        assert!((sum_exp(&xs) - want).abs() <= want * 1e-6);
    }
}
