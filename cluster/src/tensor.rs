//! The tensor type: a row-major f32 array with a shape, in host memory (what crosses every process
//! and crate boundary); and the device enum.

use crate::ShapeError;

/// Where a tensor's data lives and where the operations on it run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// Host memory, computed by the kernels in `tessera_kernels::cpu`.
    #[default]
    Cpu,
    /// The CUDA GPU with this ordinal, computed by the kernels in `tessera_kernels::cuda`. Chosen
    /// at run time (`tessera_kernels::cuda::DeviceChoice::resolve`) only when the driver and the
    /// device are there.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// A dense, contiguous, row-major f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// Wraps `data` with `shape`; the element count must match.
    pub fn new(shape: impl Into<Vec<usize>>, data: Vec<f32>) -> Result<Self, ShapeError> {
        let shape = shape.into();
        // Shapes may come from the network: a product past usize is an error, never a wrap.
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        match n {
            Some(n) if n == data.len() => Ok(Self { shape, data }),
            Some(n) => Err(ShapeError::new("Tensor::new", format!("shape {shape:?} holds {n} elements, data has {}", data.len()))),
            None => Err(ShapeError::new("Tensor::new", format!("shape {shape:?} holds more elements than this machine can address"))),
        }
    }

    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Vec<usize>>) -> Self {
        let shape = shape.into();
        let n = shape.iter().product();
        Self { shape, data: vec![0.0; n] }
    }

    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Size of dimension `i` (negative counts from the end, as in PyTorch).
    pub fn dim(&self, i: isize) -> usize {
        let r = self.shape.len() as isize;
        self.shape[if i < 0 { (r + i) as usize } else { i as usize }]
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The device holding the data (always host memory: device buffers are `cudarc` slices
    /// handled by `tessera_kernels::cuda`).
    pub fn device(&self) -> Device {
        Device::Cpu
    }

    /// The elements, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The elements, row-major, mutable.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Takes the elements out.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Same data, another shape with the same element count.
    pub fn reshape(mut self, shape: impl Into<Vec<usize>>) -> Result<Self, ShapeError> {
        let shape = shape.into();
        if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(self.data.len()) {
            return Err(ShapeError::new("Tensor::reshape", format!("{:?} -> {shape:?}", self.shape)));
        }
        self.shape = shape;
        Ok(self)
    }

    /// Checks that the shape is exactly `want`, naming `what` in the error.
    pub fn expect_shape(&self, what: &str, want: &[usize]) -> Result<(), ShapeError> {
        if self.shape != want {
            return Err(ShapeError::new("expect_shape", format!("{what}: expected {want:?}, got {:?}", self.shape)));
        }
        Ok(())
    }

    /// Rows `[start, end)` along the first dimension, copied.
    pub fn rows(&self, start: usize, end: usize) -> Result<Tensor, ShapeError> {
        let n0 = *self.shape.first().unwrap_or(&0);
        if start > end || end > n0 {
            return Err(ShapeError::new("Tensor::rows", format!("rows {start}..{end} of {:?}", self.shape)));
        }
        let inner: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        Ok(Tensor { shape, data: self.data[start * inner..end * inner].to_vec() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_checks() {
        assert!(Tensor::new([2, 3], vec![0.0; 5]).is_err());
        let t = Tensor::new([2, 3], (0..6).map(|x| x as f32).collect()).unwrap();
        assert_eq!(t.dim(-1), 3);
        assert_eq!(t.rows(1, 2).unwrap().data(), &[3.0, 4.0, 5.0]);
        assert!(t.rows(1, 3).is_err());
        let r = t.reshape([3, 2]).unwrap();
        assert_eq!(r.shape(), &[3, 2]);
        assert!(r.expect_shape("x", &[2, 3]).is_err());
        // A shape whose product wraps to the data's length (0 here) is refused, not accepted.
        let err = Tensor::new([1usize << 32, 1 << 32, 1], Vec::new()).unwrap_err().to_string();
        assert!(err.contains("more elements than this machine can address"), "{err}");
    }
}
