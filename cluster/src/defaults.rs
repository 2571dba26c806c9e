//! Every default of a generation, in one place: what a request that leaves a field unset gets.
//! The sizes and steps are Wan 2.1's (upstream's pipeline); a served model may advertise its own
//! (`ModelInfo`), which the coordinator then applies instead.

/// Frame width in pixels.
pub const WIDTH: u32 = 832;
/// Frame height in pixels.
pub const HEIGHT: u32 = 480;
/// Frames (5 s at 16 fps).
pub const NUM_FRAMES: u32 = 81;
/// Denoising steps.
pub const STEPS: u32 = 50;
/// Frames per second of the output file.
pub const FPS: u32 = 16;
/// Classifier-free guidance scale.
pub const GUIDANCE_SCALE: f32 = 5.0;
/// Video-to-video strength (upstream's).
pub const STRENGTH: f32 = 0.8;
