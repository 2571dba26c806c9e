//! A counter-based random generator (Philox 4x32-10): the value at an index depends only on the
//! seed, the stream and the index, so any slice of a tensor can be generated anywhere, in any
//! order, and comes out identical (same seed → same noise, whatever the number of workers).

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// One Philox 4x32 block with 10 rounds.
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for _ in 0..10 {
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        c = [((p1 >> 32) as u32) ^ c[1] ^ k[0], p1 as u32, ((p0 >> 32) as u32) ^ c[3] ^ k[1], p0 as u32];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// Standard normal samples `index .. index + out.len()` of the stream `(seed, stream)`.
/// Each pair of samples comes from one Philox block through Box–Muller.
pub fn fill_normal(seed: u64, stream: u64, index: u64, out: &mut [f32]) {
    let key = [seed as u32, (seed >> 32) as u32];
    for (i, o) in out.iter_mut().enumerate() {
        let idx = index + i as u64;
        let pair = idx / 2;
        let r = philox4x32([pair as u32, (pair >> 32) as u32, stream as u32, (stream >> 32) as u32], key);
        // u1 in (0, 1], u2 in [0, 1): 24-bit mantissas, f64 for the transform.
        let u1 = ((r[0] >> 8) as f64 + 1.0) / (1u64 << 24) as f64;
        let u2 = (r[1] >> 8) as f64 / (1u64 << 24) as f64;
        let rad = (-2.0 * u1.ln()).sqrt();
        let ang = 2.0 * std::f64::consts::PI * u2;
        *o = (if idx.is_multiple_of(2) { rad * ang.cos() } else { rad * ang.sin() }) as f32;
    }
}

/// Uniform samples in [−1, 1) at `index .. index + out.len()` of the stream `(seed, stream)`;
/// four samples per Philox block (cheaper than [`fill_normal`], for bulk random weights).
pub fn fill_uniform(seed: u64, stream: u64, index: u64, out: &mut [f32]) {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut i = 0;
    while i < out.len() {
        let idx = index + i as u64;
        let block = idx / 4;
        let r = philox4x32([block as u32, (block >> 32) as u32, stream as u32, (stream >> 32) as u32], key);
        for word in &r[(idx % 4) as usize..] {
            if i == out.len() {
                break;
            }
            out[i] = ((word >> 8) as f32) * (2.0 / (1u32 << 24) as f32) - 1.0;
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_agree_with_the_whole() {
        let mut all = vec![0.0; 1001];
        fill_normal(42, 3, 0, &mut all);
        let mut part = vec![0.0; 300];
        fill_normal(42, 3, 501, &mut part);
        assert_eq!(&all[501..801], &part[..]);
        let mean = all.iter().map(|&x| x as f64).sum::<f64>() / 1001.0;
        let var = all.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / 1001.0;
        assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.15, "mean {mean} var {var}");
        let mut other = vec![0.0; 10];
        fill_normal(43, 3, 0, &mut other);
        assert_ne!(&all[..10], &other[..]);
    }

    #[test]
    fn uniform_slices_agree_and_cover_the_range() {
        let mut all = vec![0.0; 4099];
        fill_uniform(5, 1, 0, &mut all);
        let mut part = vec![0.0; 1001];
        fill_uniform(5, 1, 1233, &mut part);
        assert_eq!(&all[1233..2234], &part[..]);
        assert!(all.iter().all(|&x| (-1.0..1.0).contains(&x)));
        let mean = all.iter().map(|&x| x as f64).sum::<f64>() / all.len() as f64;
        let var = all.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / all.len() as f64;
        assert!(mean.abs() < 0.05 && (var - 1.0 / 3.0).abs() < 0.03, "mean {mean} var {var}");
    }
}
