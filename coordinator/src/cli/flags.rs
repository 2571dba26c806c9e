//! Which `tessera generate` flag sets each request field: the one table the CLI uses to name the
//! flag behind a refused field, whether the refusal came from local validation (the worker
//! crate's `InvalidInput { field }`) or from a server (the `field` of the status's `ErrorInfo`).

/// Request fields (`GenerateRequest` and the worker's generation parameters, which name some of
/// them differently) and the flag that sets each.
const FIELD_FLAGS: [(&str, &str); 24] = [
    ("prompt", "--prompt"),
    ("negative_prompt", "--negative-prompt"),
    ("height", "--height"),
    ("width", "--width"),
    ("num_frames", "--frames"),
    ("fps", "--fps"),
    ("steps", "--steps"),
    ("num_inference_steps", "--steps"),
    ("guidance_scale", "--guidance"),
    ("flow_shift", "--shift"),
    ("seed", "--seed"),
    ("input_video", "--input-video"),
    ("video", "--input-video"),
    ("strength", "--strength"),
    ("input_image", "--image"),
    ("image", "--image"),
    ("priority", "--priority"),
    ("model", "--model-name"),
    ("diffusion_forcing", "--base-frames"),
    ("diffusion_forcing.base_num_frames", "--base-frames"),
    ("diffusion_forcing.overlap_history", "--overlap-frames"),
    ("diffusion_forcing.ar_step", "--ar-step"),
    ("diffusion_forcing.causal_block_size", "--causal-block"),
    ("diffusion_forcing.addnoise_condition", "--addnoise-condition"),
];

/// The flag that sets request field `field` (a `request.` prefix, as the internal API names
/// them, is ignored); None for a field no flag sets.
pub fn flag_for_field(field: &str) -> Option<&'static str> {
    let field = field.strip_prefix("request.").unwrap_or(field);
    FIELD_FLAGS.iter().find(|(f, _)| *f == field).map(|(_, flag)| *flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_map_to_the_flags_that_set_them() {
        assert_eq!(flag_for_field("num_frames"), Some("--frames"));
        assert_eq!(flag_for_field("num_inference_steps"), flag_for_field("steps"));
        assert_eq!(flag_for_field("request.strength"), Some("--strength"));
        assert_eq!(flag_for_field("nccl_unique_id"), None);
        assert_eq!(flag_for_field("diffusion_forcing.causal_block_size"), Some("--causal-block"));
    }
}
