//! Comparing an output with its reference: relative L2 error and maximum absolute error.

use serde::Deserialize;

/// A case's tolerance (`case.json` `tolerance`): pass when `rel_l2` holds and either absolute
/// bound holds. NaN never passes.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Tolerance {
    /// Bound on ‖out − ref‖₂ / ‖ref‖₂.
    pub rel_l2: f64,
    /// Bound on max |out − ref|.
    #[serde(default)]
    pub max_abs: Option<f64>,
    /// Bound on max |out − ref| / max |ref|.
    #[serde(default)]
    pub max_abs_over_max_ref: Option<f64>,
}

/// The errors of one output against its reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Comparison {
    /// ‖out − ref‖₂ / ‖ref‖₂ (NaN if any value is NaN).
    pub rel_l2: f64,
    /// max |out − ref|.
    pub max_abs: f64,
    /// max |ref|.
    pub max_ref: f64,
    /// Whether the tolerance holds.
    pub passed: bool,
}

impl Comparison {
    /// Compares `got` with `want` (same length) under `tol`.
    pub fn new(got: &[f32], want: &[f32], tol: &Tolerance) -> Self {
        assert_eq!(got.len(), want.len(), "compared tensors differ in size");
        let (mut diff2, mut ref2, mut max_abs, mut max_ref, mut nan) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, false);
        for (&g, &w) in got.iter().zip(want) {
            let (g, w) = (g as f64, w as f64);
            nan |= g.is_nan() || w.is_nan();
            let d = g - w;
            diff2 += d * d;
            ref2 += w * w;
            max_abs = max_abs.max(d.abs());
            max_ref = max_ref.max(w.abs());
        }
        let rel_l2 = if nan {
            f64::NAN
        } else if ref2 > 0.0 {
            (diff2 / ref2).sqrt()
        } else if diff2 == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        let abs_ok = tol.max_abs.is_some_and(|m| max_abs <= m) || tol.max_abs_over_max_ref.is_some_and(|m| max_abs <= m * max_ref);
        let abs_ok = abs_ok || (tol.max_abs.is_none() && tol.max_abs_over_max_ref.is_none());
        let passed = !nan && rel_l2 <= tol.rel_l2 && abs_ok;
        Self { rel_l2, max_abs: if nan { f64::NAN } else { max_abs }, max_ref, passed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tol() -> Tolerance {
        Tolerance { rel_l2: 1e-4, max_abs: None, max_abs_over_max_ref: Some(1e-3) }
    }

    #[test]
    fn passes_and_fails_on_the_stated_bounds() {
        let want = vec![1.0f32, -2.0, 3.0, 4.0];
        assert!(Comparison::new(&want, &want, &tol()).passed);
        let mut got = want.clone();
        got[3] += 1e-5;
        let c = Comparison::new(&got, &want, &tol());
        assert!(c.passed && c.rel_l2 > 0.0);
        got[3] += 1e-2;
        assert!(!Comparison::new(&got, &want, &tol()).passed);
        // rel_l2 fine but one element far off relative to max |ref|
        let tight = Tolerance { rel_l2: 1.0, max_abs: Some(1e-6), max_abs_over_max_ref: None };
        assert!(!Comparison::new(&got, &want, &tight).passed);
    }

    #[test]
    fn nan_never_passes() {
        let want = vec![1.0f32, 2.0];
        let got = vec![1.0f32, f32::NAN];
        let loose = Tolerance { rel_l2: f64::INFINITY, max_abs: Some(f64::INFINITY), max_abs_over_max_ref: None };
        assert!(!Comparison::new(&got, &want, &loose).passed);
    }
}
