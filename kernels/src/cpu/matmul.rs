//! Matrix products on the CPU through the `gemm` crate (multi-threaded, AVX-512/AVX2 tuned),
//! with bias and activation epilogues for `nn.Linear`-style layers.

use super::activation::{apply_activation, Activation};
use crate::{KernelError, Result};

/// A strided view of an f32 matrix inside a slice: element (r, c) is at `r·rs + c·cs`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A view; fails if the last element lies outside `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Result<Self> {
        check_extent("MatRef", data.len(), rows, cols, rs, cs)?;
        Ok(Self { data, rows, cols, rs, cs })
    }
    /// Row-major `rows × cols`, rows `ld` apart.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Result<Self> {
        Self::new(data, rows, cols, ld, 1)
    }
    /// The transpose of a row-major `cols × rows` matrix with rows `ld` apart (no copy).
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Result<Self> {
        Self::new(data, rows, cols, 1, ld)
    }
}

fn check_extent(op: &'static str, len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (rows - 1) * rs + (cols - 1) * cs;
    if last >= len {
        return Err(KernelError::shape(op, format!("{rows}x{cols} view with strides ({rs},{cs}) needs {} elements, slice has {len}", last + 1)));
    }
    Ok(())
}

/// How many threads one product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// Run on the calling thread (inside an outer parallel loop).
    One,
    /// Use the global pool.
    Pool,
}

/// `dst[m,n] = (accumulate ? dst : 0) + a[m,k]·b[k,n]`, where `dst` is row-major with rows `ld_dst` apart.
pub fn gemm_into(dst: &mut [f32], ld_dst: usize, accumulate: bool, a: MatRef<'_>, b: MatRef<'_>, threads: Threads) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        return Err(KernelError::shape("gemm", format!("a is {m}x{k}, b is {}x{n}", b.rows)));
    }
    check_extent("gemm dst", dst.len(), m, n, ld_dst, 1)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ld_dst..r * ld_dst + n].fill(0.0);
            }
        }
        return Ok(());
    }
    let par = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::Pool if (m * n * k) < 32 * 1024 => gemm::Parallelism::None,
        Threads::Pool => gemm::Parallelism::Rayon(rayon::current_num_threads()),
    };
    // SAFETY: every view was bounds-checked above (`check_extent`): all elements gemm reads
    // lie inside `a.data` / `b.data` and all it writes inside `dst`, which is borrowed mutably
    // and so cannot alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld_dst as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// `nn.Linear`: `y[m, n] = act(x[m, k] · w[n, k]ᵀ + bias[n])`, with PyTorch's weight layout.
pub fn linear(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, act: Activation) -> Result<Vec<f32>> {
    let mut y = vec![0.0f32; m * n];
    linear_into(x, m, k, w, n, bias, act, &mut y)?;
    Ok(y)
}

/// [`linear`] into `y` (exactly `m·n` elements, packed rows).
#[allow(clippy::too_many_arguments)]
pub fn linear_into(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, act: Activation, y: &mut [f32]) -> Result<()> {
    if x.len() != m * k || w.len() != n * k || y.len() != m * n {
        return Err(KernelError::shape("linear", format!("x has {} elements for {m}x{k}, w {} for {n}x{k}, y {} for {m}x{n}", x.len(), w.len(), y.len())));
    }
    let accumulate = match bias {
        Some(b) => {
            if b.len() != n {
                return Err(KernelError::shape("linear", format!("bias has {} elements, out features {n}", b.len())));
            }
            for row in y.chunks_exact_mut(n) {
                row.copy_from_slice(b);
            }
            true
        }
        None => false,
    };
    gemm_into(y, n, accumulate, MatRef::row_major(x, m, k, k)?, MatRef::transposed(w, k, n, k)?, Threads::Pool)?;
    apply_activation(y, act);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, b: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = b[j] as f64;
                for t in 0..k {
                    s += x[i * k + t] as f64 * w[j * k + t] as f64;
                }
                y[i * n + j] = s as f32;
            }
        }
        y
    }

    #[test]
    fn linear_matches_naive() {
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (67, 130, 33), (200, 64, 129)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
            let y = linear(&x, m, k, &w, n, Some(&b), Activation::None).unwrap();
            let r = naive(&x, m, k, &w, n, &b);
            for (a, e) in y.iter().zip(&r) {
                assert!((a - e).abs() <= 1e-4 * (1.0 + e.abs()), "{m}x{k}x{n}: {a} vs {e}");
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(linear(&[1.0; 6], 2, 3, &[1.0; 5], 2, None, Activation::None).is_err());
        assert!(linear(&[1.0; 6], 2, 3, &[1.0; 6], 2, Some(&[0.0; 3]), Activation::None).is_err());
        assert!(MatRef::row_major(&[0.0; 5], 2, 3, 3).is_err());
    }
}
