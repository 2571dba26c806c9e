//! A diffusers snapshot folder: `model_index.json` names the pipeline class and, for each
//! component folder, the library and class that wrote it. Checked before anything is loaded, so a
//! wrong folder fails with a message naming the component.

use crate::{Result, WorkerError};
use std::path::{Path, PathBuf};

/// Pipeline classes whose components this crate loads (text-to-video and video-to-video share
/// them; SkyReels-V2's diffusion forcing has the same components, its own transformer class, in
/// each of its three classes; image-to-video adds the image encoder and its processor).
pub const SUPPORTED_PIPELINES: [&str; 6] = [
    "WanPipeline",
    "WanVideoToVideoPipeline",
    DIFFUSION_FORCING_PIPELINES[0],
    DIFFUSION_FORCING_PIPELINES[1],
    DIFFUSION_FORCING_PIPELINES[2],
    IMAGE_TO_VIDEO_PIPELINE,
];

/// SkyReels-V2's diffusion-forcing classes (from text, an image, a video): one snapshot layout,
/// one run (what it starts from is the request's).
pub const DIFFUSION_FORCING_PIPELINES: [&str; 3] =
    [DIFFUSION_FORCING_PIPELINE, "SkyReelsV2DiffusionForcingImageToVideoPipeline", "SkyReelsV2DiffusionForcingVideoToVideoPipeline"];

/// Wan 2.1's image-to-video pipeline.
pub const IMAGE_TO_VIDEO_PIPELINE: &str = "WanImageToVideoPipeline";

/// SkyReels-V2's long-video pipeline (diffusion forcing, chunk by chunk).
pub const DIFFUSION_FORCING_PIPELINE: &str = "SkyReelsV2DiffusionForcingPipeline";

/// The components of a checked snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The snapshot folder.
    pub root: PathBuf,
    /// `_class_name` of `model_index.json`.
    pub pipeline_class: String,
}

impl Snapshot {
    /// Reads and checks `root/model_index.json`.
    pub fn open(root: &Path) -> Result<Self> {
        let path = root.join("model_index.json");
        let text = std::fs::read_to_string(&path).map_err(|source| WorkerError::Io { path: path.clone(), source })?;
        let bad = |detail: String| WorkerError::Config { path: path.display().to_string(), detail };
        let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let class = index.get("_class_name").and_then(|v| v.as_str()).ok_or_else(|| bad("no _class_name".into()))?;
        if !SUPPORTED_PIPELINES.contains(&class) {
            return Err(bad(format!("pipeline {class} is not supported (supported: {})", SUPPORTED_PIPELINES.join(", "))));
        }
        let transformer = if DIFFUSION_FORCING_PIPELINES.contains(&class) { "SkyReelsV2Transformer3DModel" } else { "WanTransformer3DModel" };
        let mut expect =
            vec![("transformer", transformer), ("vae", "AutoencoderKLWan"), ("text_encoder", "UMT5EncoderModel"), ("scheduler", ""), ("tokenizer", "")];
        if class == IMAGE_TO_VIDEO_PIPELINE {
            expect.extend([("image_encoder", "CLIPVisionModel"), ("image_processor", "CLIPImageProcessor")]);
        }
        for (component, want_class) in expect {
            let entry = index.get(component).and_then(|v| v.as_array()).ok_or_else(|| bad(format!("component `{component}` is missing")))?;
            let got = entry.get(1).and_then(|v| v.as_str()).unwrap_or_default();
            if !want_class.is_empty() && got != want_class {
                return Err(bad(format!("component `{component}` is {got:?}, expected {want_class}")));
            }
            if !root.join(component).is_dir() {
                return Err(bad(format!("component folder `{component}/` is missing")));
            }
        }
        // Wan 2.2 adds a second, low-noise transformer; not served by this pipeline.
        if index.get("transformer_2").and_then(|v| v.as_array()).is_some_and(|a| a.iter().any(|x| !x.is_null())) {
            return Err(bad("a second transformer (`transformer_2`, Wan 2.2) is not supported".into()));
        }
        Ok(Self { root: root.to_path_buf(), pipeline_class: class.to_string() })
    }

    /// Whether the snapshot is an image-to-video pipeline (with `image_encoder/` and
    /// `image_processor/`).
    pub fn is_image_to_video(&self) -> bool {
        self.pipeline_class == IMAGE_TO_VIDEO_PIPELINE
    }

    /// Whether the snapshot is a diffusion-forcing (long-video) pipeline.
    pub fn is_diffusion_forcing(&self) -> bool {
        DIFFUSION_FORCING_PIPELINES.contains(&self.pipeline_class.as_str())
    }

    /// The folder of `component`.
    pub fn component(&self, component: &str) -> PathBuf {
        self.root.join(component)
    }

    /// The name a snapshot at `root` is served under when none is configured: its folder's name
    /// (`model` for a path without one). Workers and the embedded coordinator both ask here.
    pub fn default_model_name(root: &Path) -> String {
        root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_served_under_its_folders_name() {
        assert_eq!(Snapshot::default_model_name(Path::new("/models/Wan2.1-T2V-1.3B-Diffusers")), "Wan2.1-T2V-1.3B-Diffusers");
        assert_eq!(Snapshot::default_model_name(Path::new("models/demo/")), "demo");
        assert_eq!(Snapshot::default_model_name(Path::new("/")), "model");
    }

    #[test]
    fn golden_snapshot_opens_and_bad_ones_are_named() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/pipeline/t2v-a");
        let s = Snapshot::open(&root).unwrap();
        assert_eq!(s.pipeline_class, "WanPipeline");
        let tmp = tempfile::tempdir().unwrap();
        let err = Snapshot::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("model_index.json"), "{err}");
        std::fs::write(tmp.path().join("model_index.json"), r#"{"_class_name": "WanPipeline", "vae": ["diffusers", "AutoencoderKLWan"]}"#).unwrap();
        let err = Snapshot::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("`transformer`"), "{err}");
        std::fs::write(tmp.path().join("model_index.json"), r#"{"_class_name": "FluxPipeline"}"#).unwrap();
        assert!(Snapshot::open(tmp.path()).unwrap_err().to_string().contains("FluxPipeline"));
        // Image-to-video: the image encoder and its processor are checked component by component.
        let i2v = Snapshot::open(&root.join("../i2v-a")).unwrap();
        assert!(i2v.is_image_to_video());
        let index = std::fs::read_to_string(root.join("../i2v-a/model_index.json")).unwrap();
        std::fs::write(tmp.path().join("model_index.json"), index.replace("CLIPVisionModel", "SiglipVisionModel")).unwrap();
        for c in ["transformer", "vae", "text_encoder", "scheduler", "tokenizer", "image_encoder", "image_processor"] {
            std::fs::create_dir_all(tmp.path().join(c)).unwrap();
        }
        let err = Snapshot::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("`image_encoder`") && err.contains("SiglipVisionModel"), "{err}");
    }
}
