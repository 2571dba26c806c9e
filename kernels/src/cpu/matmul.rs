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

/// The most of the inner dimension one `gemm` call sums: longer products go as a sequence of
/// calls of at most this many terms, each adding into the result. The `gemm` crate sums up to 512
/// terms (its smallest `kc`) in one pass whatever the shape, but splits longer sums in ways that
/// depend on the number of columns (measured: k = 864, columns 0..50 of a 100-column product
/// differ from the same 50 columns alone by up to 1e-5). Fixed blocks make every element of a
/// product the same sum whatever the other columns: a band of a frame (the split VAE) or a shard
/// of tokens gives the one-device values bit for bit.
const K_BLOCK: usize = 512;

/// `dst[m,n] = (accumulate ? dst : 0) + a[m,k]·b[k,n]`, where `dst` is row-major with rows `ld_dst`
/// apart. Each element's sum is the same whatever `m` and `n` (see [`K_BLOCK`]).
pub fn gemm_into(dst: &mut [f32], ld_dst: usize, accumulate: bool, a: MatRef<'_>, b: MatRef<'_>, threads: Threads) -> Result<()> {
    let k = a.cols;
    if k <= K_BLOCK || b.rows != k {
        return gemm_block(dst, ld_dst, accumulate, a, b, threads);
    }
    let mut k0 = 0;
    while k0 < k {
        let kk = K_BLOCK.min(k - k0);
        let a_part = MatRef { data: &a.data[k0 * a.cs..], rows: a.rows, cols: kk, rs: a.rs, cs: a.cs };
        let b_part = MatRef { data: &b.data[k0 * b.rs..], rows: kk, cols: b.cols, rs: b.rs, cs: b.cs };
        gemm_block(dst, ld_dst, accumulate || k0 > 0, a_part, b_part, threads)?;
        k0 += kk;
    }
    Ok(())
}

/// [`gemm_into`] as one `gemm` call.
fn gemm_block(dst: &mut [f32], ld_dst: usize, accumulate: bool, a: MatRef<'_>, b: MatRef<'_>, threads: Threads) -> Result<()> {
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

    /// Every element of a product is the same sum whatever the other columns (and rows): the
    /// first half of a wide product's columns equals the product of those columns alone, bit for
    /// bit, also for inner dimensions past `K_BLOCK` and for the shapes where one `gemm` call
    /// differed (k = 864 and 1728 at 100 and 128 columns).
    #[test]
    fn each_element_is_the_same_sum_whatever_the_other_columns() {
        for (m, k) in [(32usize, 864usize), (64, 1728), (16, 432)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 211) as f32 / 105.0) - 1.0).collect();
            for n in [48usize, 100, 128, 256, 1000] {
                let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729 % 307) as f32 / 153.0) - 1.0).collect();
                let h = n / 2;
                let b_half: Vec<f32> = (0..k).flat_map(|r| b[r * n..r * n + h].to_vec()).collect();
                let (mut wide, mut half) = (vec![0.0f32; m * n], vec![0.0f32; m * h]);
                gemm_into(&mut wide, n, false, MatRef::row_major(&a, m, k, k).unwrap(), MatRef::row_major(&b, k, n, n).unwrap(), Threads::Pool).unwrap();
                gemm_into(&mut half, h, false, MatRef::row_major(&a, m, k, k).unwrap(), MatRef::row_major(&b_half, k, h, h).unwrap(), Threads::Pool).unwrap();
                for r in 0..m {
                    assert!(wide[r * n..r * n + h] == half[r * h..(r + 1) * h], "m {m} k {k} n {n}: row {r} differs");
                }
                // the top rows alone too
                let mut top = vec![0.0f32; 3 * n];
                gemm_into(&mut top, n, false, MatRef::row_major(&a, 3, k, k).unwrap(), MatRef::row_major(&b, k, n, n).unwrap(), Threads::Pool).unwrap();
                assert!(top == wide[..3 * n], "m {m} k {k} n {n}: the first rows alone differ");
            }
        }
    }

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
