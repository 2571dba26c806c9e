//! UniPC (bh1/bh2, data prediction, flow sigmas) as diffusers' `UniPCMultistepScheduler.step`
//! computes it (reference/wan2.1.md §5.3): the scalar coefficients, in float32 with torch's order of
//! operations (the element-wise corrector + predictor is the backend's `sampler_step`).

use super::config::{SolverType, UniPcOptions};

/// λ(σ) = ln(1 − σ) − ln σ in float32 (+∞ at σ = 0).
fn lambda(sigma: f32) -> f32 {
    (1.0f32 - sigma).ln() - sigma.ln()
}

/// Solves `[[1, 1], [r, 1]]·ρ = b` in float32 the way LAPACK `sgesv` (MKL, as torch calls it)
/// does: partial pivoting, then substitution multiplying by reciprocals of the pivots.
fn solve_2x2(r: f32, b: [f32; 2]) -> [f32; 2] {
    let (mut a00, mut a01, mut a10, mut a11) = (1.0f32, 1.0f32, r, 1.0f32);
    let (mut r0, mut r1) = (b[0], b[1]);
    if a10.abs() > a00.abs() {
        std::mem::swap(&mut a00, &mut a10);
        std::mem::swap(&mut a01, &mut a11);
        std::mem::swap(&mut r0, &mut r1);
    }
    let l = a10 * (1.0f32 / a00);
    let u11 = a11 - l * a01;
    let y1 = r1 - l * r0;
    let x1 = y1 * (1.0f32 / u11);
    let x0 = (r0 - a01 * x1) * (1.0f32 / a00);
    [x0, x1]
}

/// The scalars shared by a UniPC predictor or corrector going from σ_s to σ_t.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Transition {
    /// σ_t / σ_s.
    ratio: f32,
    /// α_t · φ₁ with φ₁ = expm1(−h).
    alpha_phi: f32,
    /// α_t · B(h).
    alpha_b: f32,
    /// −h.
    hh: f32,
    /// B(h).
    b_h: f32,
    /// λ_s (for r_k).
    lambda_s: f32,
    /// h = λ_t − λ_s.
    h: f32,
    /// φ₁.
    phi_1: f32,
}

impl Transition {
    fn new(sigma_s: f32, sigma_t: f32, solver: SolverType) -> Self {
        let alpha_t = 1.0f32 - sigma_t;
        let (lambda_t, lambda_s) = (lambda(sigma_t), lambda(sigma_s));
        let h = lambda_t - lambda_s;
        let hh = -h;
        let phi_1 = hh.exp_m1();
        let b_h = match solver {
            SolverType::Bh1 => hh,
            SolverType::Bh2 => hh.exp_m1(),
        };
        Self { ratio: sigma_t / sigma_s, alpha_phi: alpha_t * phi_1, alpha_b: alpha_t * b_h, hh, b_h, lambda_s, h, phi_1 }
    }

    /// r_k = (λ_k − λ_s) / h for an earlier σ_k.
    fn r(&self, sigma_k: f32) -> f32 {
        (lambda(sigma_k) - self.lambda_s) / self.h
    }
}

pub use tessera_kernels::cpu::{UniPcCorrector, UniPcPredictor, UniPcStep};

/// Predictor order at step i of a run started at `first`, as diffusers' warm-up and
/// `lower_order_final` give it.
fn predictor_order(opts: &UniPcOptions, n: usize, first: usize, i: usize) -> usize {
    let mut order = opts.solver_order;
    if opts.lower_order_final {
        order = order.min(n - i);
    }
    order.min(i - first + 1)
}

/// The coefficients of UniPC step `i` over `sigmas` (N+1 values) for a run started at `first`.
pub(super) fn step(sigmas: &[f32], opts: &UniPcOptions, first: usize, i: usize) -> UniPcStep {
    let n = sigmas.len() - 1;
    let p = Transition::new(sigmas[i], sigmas[i + 1], opts.solver_type);
    let order = predictor_order(opts, n, first, i);
    let predictor = UniPcPredictor { ratio: p.ratio, alpha_phi: p.alpha_phi, alpha_b: p.alpha_b, r: (order == 2).then(|| p.r(sigmas[i - 1])) };
    let corrector = (i > first && !opts.disable_corrector.contains(&(i - 1))).then(|| {
        let c = Transition::new(sigmas[i - 1], sigmas[i], opts.solver_type);
        let last_order = predictor_order(opts, n, first, i - 1);
        if last_order == 1 {
            return UniPcCorrector { ratio: c.ratio, alpha_phi: c.alpha_phi, alpha_b: c.alpha_b, second_order: None, rho_last: 0.5 };
        }
        // b_k = h·φ_k(h)·k!/B(h), φ_{k+1} = φ_k/hh − 1/(k+1)! (diffusers' recursion, float32).
        let r = c.r(sigmas[i - 2]);
        let phi_k = c.phi_1 / c.hh - 1.0;
        let b1 = phi_k * 1.0 / c.b_h;
        let phi_k = phi_k / c.hh - 0.5;
        let b2 = phi_k * 2.0 / c.b_h;
        let [rho0, rho1] = solve_2x2(r, [b1, b2]);
        UniPcCorrector { ratio: c.ratio, alpha_phi: c.alpha_phi, alpha_b: c.alpha_b, second_order: Some((r, rho0)), rho_last: rho1 }
    });
    UniPcStep { sigma: sigmas[i], corrector, predictor }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_2x2_solves_with_and_without_pivoting() {
        for r in [-0.5f32, -1.5, -12.0, 0.3] {
            let b = [0.55f32, 0.38];
            let [x0, x1] = solve_2x2(r, b);
            assert!((x0 + x1 - b[0]).abs() < 1e-6, "r {r}");
            assert!((r * x0 + x1 - b[1]).abs() < 1e-5, "r {r}");
        }
    }

    #[test]
    fn orders_warm_up_and_drop_at_the_end() {
        let o = UniPcOptions::default();
        let orders: Vec<usize> = (0..5).map(|i| predictor_order(&o, 5, 0, i)).collect();
        assert_eq!(orders, vec![1, 2, 2, 2, 1]);
        let late: Vec<usize> = (3..6).map(|i| predictor_order(&o, 6, 3, i)).collect();
        assert_eq!(late, vec![1, 2, 1]);
        let first_order = UniPcOptions { solver_order: 1, ..o };
        assert!((0..5).all(|i| predictor_order(&first_order, 5, 0, i) == 1));
    }

    #[test]
    fn first_step_has_no_corrector_and_last_lands_on_the_data_estimate() {
        let sigmas = [0.999999f32, 0.7, 0.3, 0.0];
        let o = UniPcOptions::default();
        let s0 = step(&sigmas, &o, 0, 0);
        assert!(s0.corrector.is_none() && s0.predictor.r.is_none());
        let s1 = step(&sigmas, &o, 0, 1);
        assert!(s1.corrector.unwrap().second_order.is_none() && s1.predictor.r.is_some());
        let s2 = step(&sigmas, &o, 0, 2);
        assert!(s2.corrector.unwrap().second_order.is_some() && s2.predictor.r.is_none());
        assert_eq!(s2.predictor.ratio, 0.0);
        assert_eq!(s2.predictor.alpha_phi, -1.0);
        let disabled = UniPcOptions { disable_corrector: vec![1], ..o };
        assert!(step(&sigmas, &disabled, 0, 2).corrector.is_none());
        assert!(step(&sigmas, &disabled, 0, 1).corrector.is_some());
    }
}
