//! Reading safetensors weights: single files or sharded folders (`*.safetensors.index.json`),
//! memory-mapped, stored as f32, bf16 or f16 (widened to f32), with every tensor's name and shape
//! checked, and a deterministic random source with the same interface for built-in presets.

use crate::{Result, WorkerError};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorInfo};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One memory-mapped `.safetensors` file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

impl SafetensorsFile {
    /// Maps `path` and parses its header.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| WorkerError::Io { path: path.into(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and private to this process; weight files are not
        // modified while a model is loaded (the same contract as every mmap-based loader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (header_len, meta) =
            safetensors::SafeTensors::read_metadata(&mmap[..]).map_err(|e| WorkerError::Safetensors { path: path.into(), detail: e.to_string() })?;
        let tensors = meta.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
        Ok(Self { path: path.into(), mmap, data_start: 8 + header_len, tensors })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Shape of `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| WorkerError::MissingTensor { name: name.into(), source_desc: self.path.display().to_string() })
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[self.data_start + info.data_offsets.0..self.data_start + info.data_offsets.1]
    }

    /// Reads `name` widened to f32 (from f32, bf16, f16, f64, i64 or i32), with its shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.info(name)?;
        let b = self.bytes(info);
        let bad = |detail: String| WorkerError::BadTensor { name: name.into(), detail };
        let n: usize = info.shape.iter().product();
        let width = match info.dtype {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => return Err(bad(format!("dtype {other:?} is not supported (f32, bf16, f16, f64, i64, i32 are)"))),
        };
        if b.len() != n * width {
            return Err(bad(format!("{} bytes for shape {:?} of {:?}", b.len(), info.shape, info.dtype)));
        }
        let mut out = vec![0.0f32; n];
        const CHUNK: usize = 1 << 16;
        let dtype = info.dtype;
        out.par_chunks_mut(CHUNK).zip(b.par_chunks(CHUNK * width)).for_each(|(o, src)| {
            for (x, c) in o.iter_mut().zip(src.chunks_exact(width)) {
                *x = match dtype {
                    Dtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    Dtype::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                    Dtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                    Dtype::F64 => f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32,
                    Dtype::I64 => i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32,
                    Dtype::I32 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32,
                    _ => unreachable!("dtype checked above"),
                };
            }
        });
        Ok((info.shape.clone(), out))
    }

    /// Reads a uint8 tensor (an image), with its shape.
    pub fn read_u8(&self, name: &str) -> Result<(Vec<usize>, Vec<u8>)> {
        let info = self.info(name)?;
        let n: usize = info.shape.iter().product();
        let b = self.bytes(info);
        if info.dtype != Dtype::U8 || b.len() != n {
            return Err(WorkerError::BadTensor {
                name: name.into(),
                detail: format!("{:?} of {} bytes for shape {:?}, expected uint8", info.dtype, b.len(), info.shape),
            });
        }
        Ok((info.shape.clone(), b.to_vec()))
    }

    /// Reads an integer tensor (i64 or i32), with its shape.
    pub fn read_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let info = self.info(name)?;
        let b = self.bytes(info);
        let v = match info.dtype {
            Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
            Dtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64).collect(),
            other => return Err(WorkerError::BadTensor { name: name.into(), detail: format!("dtype {other:?} is not an integer type") }),
        };
        Ok((info.shape.clone(), v))
    }
}

/// Where a model's parameters come from.
pub trait WeightSource {
    /// The tensor `name`, which must have exactly `shape`, as f32.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    /// Whether `name` exists (for optional parameters).
    fn contains(&self, name: &str) -> bool;
    /// Called once every parameter was taken: fails if the source holds tensors nobody asked for.
    fn finish(&self) -> Result<()>;
}

/// Weights from one or more safetensors files (a diffusers or transformers component folder).
pub struct WeightStore {
    files: Vec<SafetensorsFile>,
    owner: HashMap<String, usize>,
    taken: Mutex<BTreeSet<String>>,
    ignored: Vec<String>,
    desc: String,
}

impl WeightStore {
    /// Opens the weights of a component folder: `<stem>.safetensors`, or the shards listed by
    /// `<stem>.safetensors.index.json`, for the stems `diffusion_pytorch_model` and `model`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        for stem in ["diffusion_pytorch_model", "model"] {
            let index = dir.join(format!("{stem}.safetensors.index.json"));
            if index.is_file() {
                return Self::open_index(&index);
            }
            let single = dir.join(format!("{stem}.safetensors"));
            if single.is_file() {
                return Self::open_files(&[single], dir.display().to_string());
            }
        }
        Err(WorkerError::Io {
            path: dir.into(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no diffusion_pytorch_model.safetensors, model.safetensors or *.safetensors.index.json in this folder",
            ),
        })
    }

    /// Opens the shards named by a `*.safetensors.index.json` (`weight_map`: tensor → file).
    pub fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|source| WorkerError::Io { path: index.into(), source })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| WorkerError::Safetensors { path: index.into(), detail: e.to_string() })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| WorkerError::Safetensors { path: index.into(), detail: "no weight_map object".into() })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect::<BTreeSet<_>>().into_iter().collect();
        shards.sort();
        let store = Self::open_files(&shards, index.display().to_string())?;
        for (name, file) in map {
            let want = dir.join(file.as_str().unwrap_or_default());
            match store.owner.get(name) {
                Some(&i) if store.files[i].path == want => {}
                _ => return Err(WorkerError::MissingTensor { name: name.clone(), source_desc: want.display().to_string() }),
            }
        }
        Ok(store)
    }

    /// Opens the given files as one store; a tensor name may appear only once.
    pub fn open_files(paths: &[PathBuf], desc: String) -> Result<Self> {
        let files = paths.iter().map(|p| SafetensorsFile::open(p)).collect::<Result<Vec<_>>>()?;
        let mut owner = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.tensors.keys() {
                if owner.insert(name.clone(), i).is_some() {
                    return Err(WorkerError::BadTensor { name: name.clone(), detail: format!("appears in more than one shard of {desc}") });
                }
            }
        }
        Ok(Self { files, owner, taken: Mutex::new(BTreeSet::new()), ignored: Vec::new(), desc })
    }

    /// Tensors that may be present and are not an error when unused (upstream's
    /// `_keys_to_ignore_on_load_unexpected`), matched by suffix.
    pub fn ignore_unused(mut self, suffixes: &[&str]) -> Self {
        self.ignored.extend(suffixes.iter().map(|s| s.to_string()));
        self
    }

    /// Shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.owner.get(name).and_then(|&i| self.files[i].shape(name))
    }
}

impl WeightSource for WeightStore {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let &i = self.owner.get(name).ok_or_else(|| WorkerError::MissingTensor { name: name.into(), source_desc: self.desc.clone() })?;
        let (got, data) = self.files[i].read_f32(name)?;
        if got != shape {
            return Err(WorkerError::BadTensor {
                name: name.into(),
                detail: format!("expected shape {shape:?}, found {got:?} in {}", self.files[i].path.display()),
            });
        }
        self.taken.lock().expect("weight bookkeeping").insert(name.to_string());
        Ok(data)
    }

    fn contains(&self, name: &str) -> bool {
        self.owner.contains_key(name)
    }

    fn finish(&self) -> Result<()> {
        let taken = self.taken.lock().expect("weight bookkeeping");
        let mut extra: Vec<String> =
            self.owner.keys().filter(|k| !taken.contains(*k) && !self.ignored.iter().any(|s| k.ends_with(s.as_str()))).cloned().collect();
        if extra.is_empty() {
            return Ok(());
        }
        extra.sort();
        extra.truncate(8);
        Err(WorkerError::UnexpectedTensors { names: extra, source_desc: self.desc.clone() })
    }
}

/// Deterministic random parameters for built-in presets: each tensor is drawn from a
/// counter-based generator keyed by a hash of its name, so it does not depend on load order.
pub struct RandomWeights {
    seed: u64,
}

impl RandomWeights {
    /// A source whose values depend only on `seed` and the tensor names.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        let mut v = vec![0.0f32; n];
        v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
            tessera_kernels::random::fill_uniform(self.seed, fnv1a(name), (i << 16) as u64, c);
        });
        // Uniform on [-1, 1) has standard deviation 1/sqrt(3); the scales below are standard
        // deviations that keep activations O(1) through many layers: 1/sqrt(fan_in) for
        // matrices and convolution kernels (fan-in = every dimension after the first), 1 ± small
        // for norm weights, small for biases and modulation tables.
        // VAE RMS norms name their weight `gamma` (shaped [C, 1, 1, 1]): treated like norm weights.
        let (scale, offset) = if (name.contains("norm") && name.ends_with(".weight")) || name.ends_with(".gamma") {
            (0.05, 1.0)
        } else if shape.len() >= 2 && !name.contains("scale_shift_table") && !name.contains("pos_embed") {
            (1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt(), 0.0)
        } else {
            (0.05, 0.0)
        };
        let scale = scale * 3f32.sqrt();
        v.par_iter_mut().for_each(|x| *x = *x * scale + offset);
        Ok(v)
    }

    fn contains(&self, _name: &str) -> bool {
        false
    }

    fn finish(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn golden_case(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/dit").join(name)
    }

    /// All tensors of a file as (name, dtype, shape, bytes).
    fn read_all(path: &Path) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<_> = st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn write(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> = tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    /// The model in `dir` on the inputs of golden case t2v-a.
    fn forward_of(dir: &Path) -> Vec<f32> {
        let model = crate::model::CpuWanTransformer::load(tessera_kernels::backend::CpuOps, dir).unwrap();
        let io = SafetensorsFile::open(&golden_case("t2v-a").join("io.safetensors")).unwrap();
        let t = |n: &str| {
            let (s, d) = io.read_f32(n).unwrap();
            tessera_kernels::Tensor::new(s, d).unwrap()
        };
        let (x, ctx) = (t("hidden_states"), t("encoder_hidden_states"));
        let (_, ts) = io.read_f32("timestep").unwrap();
        let inputs =
            crate::DitInputs { hidden_states: &x, timesteps: &ts, encoder_hidden_states: &ctx, encoder_hidden_states_image: None, options: Default::default() };
        model.forward(&inputs).unwrap().into_data()
    }

    #[test]
    fn sharded_folder_loads_the_same_model() {
        let src = golden_case("t2v-a");
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        let all = read_all(&src.join("diffusion_pytorch_model.safetensors"));
        let (a, b) = all.split_at(all.len() / 2);
        write(&tmp.path().join("diffusion_pytorch_model-00001-of-00002.safetensors"), a);
        write(&tmp.path().join("diffusion_pytorch_model-00002-of-00002.safetensors"), b);
        let mut map = serde_json::Map::new();
        for (part, file) in [(a, "diffusion_pytorch_model-00001-of-00002.safetensors"), (b, "diffusion_pytorch_model-00002-of-00002.safetensors")] {
            for t in part {
                map.insert(t.0.clone(), file.into());
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(tmp.path().join("diffusion_pytorch_model.safetensors.index.json"), index.to_string()).unwrap();
        assert_eq!(forward_of(tmp.path()), forward_of(&src));

        // an index naming a tensor that its shard does not hold is an error naming the tensor
        map.insert("blocks.9.attn1.to_q.weight".into(), "diffusion_pytorch_model-00001-of-00002.safetensors".into());
        let index = serde_json::json!({"weight_map": map});
        std::fs::write(tmp.path().join("diffusion_pytorch_model.safetensors.index.json"), index.to_string()).unwrap();
        let err = WeightStore::open_dir(tmp.path()).err().expect("must fail").to_string();
        assert!(err.contains("blocks.9.attn1.to_q.weight"), "{err}");
    }

    #[test]
    fn f16_weights_are_widened() {
        let src = golden_case("t2v-a");
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        let all: Vec<_> = read_all(&src.join("diffusion_pytorch_model.safetensors"))
            .into_iter()
            .map(|(n, _, s, b)| {
                let h: Vec<u8> = b.chunks_exact(4).flat_map(|c| half::f16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes()).collect();
                (n, Dtype::F16, s, h)
            })
            .collect();
        write(&tmp.path().join("diffusion_pytorch_model.safetensors"), &all);
        let store = WeightStore::open_dir(tmp.path()).unwrap();
        let w = store.tensor("proj_out.bias", &[16]).unwrap();
        let (_, exact) = SafetensorsFile::open(&src.join("diffusion_pytorch_model.safetensors")).unwrap().read_f32("proj_out.bias").unwrap();
        for (a, b) in w.iter().zip(&exact) {
            assert_eq!(*a, half::f16::from_f32(*b).to_f32());
        }
        let (f16_out, f32_out) = (forward_of(tmp.path()), forward_of(&src));
        let err = f16_out.iter().zip(&f32_out).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err > 0.0 && err < 0.05, "f16 rounding should change the output a little: {err}");
    }

    #[test]
    fn empty_folder_says_what_it_looked_for() {
        let tmp = tempfile::tempdir().unwrap();
        let err = WeightStore::open_dir(tmp.path()).err().expect("must fail").to_string();
        assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    }
}
