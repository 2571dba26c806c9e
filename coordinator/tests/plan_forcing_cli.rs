//! `tessera plan` of a diffusion-forcing model as a user runs it: a minute of 720p with
//! SkyReels-V2-DF-14B on 8 H100s, planned chunk by chunk (time to the first chunk, total), with
//! upstream's chunking when no flag names one, and clear errors naming the flag for a chunking
//! that does not fit or a model that does not chunk.

use std::process::Command;

fn tessera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const MINUTE_720P: [&str; 14] =
    ["plan", "--model", "skyreels-v2-df-14b", "--width", "1280", "--height", "720", "--frames", "1441", "--fps", "24", "--steps", "30", "--gpus"];

#[test]
fn a_minute_of_720p_is_planned_chunk_by_chunk() {
    let mut args = MINUTE_720P.to_vec();
    args.extend(["1,8", "--base-frames", "121", "--json"]);
    let (code, out, err) = tessera(&args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["diffusion_forcing"]["chunks"], 14);
    assert_eq!(v["diffusion_forcing"]["latent_frames"], 361);
    let plans = v["plans"].as_array().unwrap();
    let secs = |p: &serde_json::Value, k: &str| p["predicted_seconds"][k].as_f64().unwrap();
    for p in plans {
        assert_eq!(p["chunks"].as_array().unwrap().len(), 14);
        assert!(secs(p, "first_chunk") > 0.0 && secs(p, "first_chunk") < secs(p, "total") / 10.0, "{p}");
    }
    // 8 GPUs: the first chunk and the whole video come sooner than on one.
    assert!(secs(&plans[1], "total") < secs(&plans[0], "total") / 4.0);
    assert!(secs(&plans[1], "first_chunk") < secs(&plans[0], "first_chunk") / 4.0);
    // CFG halves run diffusion forcing too: the plan takes them when asked.
    let mut args = MINUTE_720P.to_vec();
    args.extend(["8", "--base-frames", "121", "--ulysses", "4", "--cfg-parallel", "--json"]);
    let (code, out, err) = tessera(&args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let halves = &v["plans"][0];
    assert!(halves["cfg_parallel"] == true && halves["ulysses"] == 4 && halves["ring"] == 1, "{halves}");
    assert!(secs(halves, "total") < secs(&plans[0], "total") / 4.0, "{halves}");
    // The table says the same for people.
    let mut args = MINUTE_720P.to_vec();
    args.extend(["8", "--base-frames", "121"]);
    let (code, out, _) = tessera(&args);
    assert_eq!(code, 0);
    assert!(out.contains("chunks  14 of up to 121 frames") && out.contains("first chunk") && out.contains("predicted"), "{out}");
}

/// Without `--base-frames` the minute is still made in chunks, as a served model makes it:
/// upstream's 97 frames overlapping by 17, so 1441 frames take (1441 − 17) / 80 rounded up = 18.
#[test]
fn a_diffusion_forcing_model_is_planned_in_upstreams_chunks_by_default() {
    let mut args = MINUTE_720P.to_vec();
    args.extend(["8", "--json"]);
    let (code, out, err) = tessera(&args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let f = &v["diffusion_forcing"];
    assert_eq!((f["base_frames"].as_u64(), f["overlap_frames"].as_u64(), f["causal_block"].as_u64()), (Some(97), Some(17), Some(1)), "{f}");
    assert_eq!(f["chunks"], 18);
    assert_eq!(v["plans"][0]["chunks"].as_array().unwrap().len(), 18);
}

#[test]
fn a_chunking_that_does_not_fit_names_the_flag() {
    let mut args = MINUTE_720P.to_vec();
    args.extend(["8", "--base-frames", "117", "--ar-step", "5", "--causal-block", "5"]);
    let (code, _, err) = tessera(&args);
    assert_ne!(code, 0);
    assert!(err.contains("--frames") && err.contains("leave a chunk of 11 latent frames") && err.contains("frames fit"), "{err}");
    let (code, _, err) = tessera(&["plan", "--model", "wan2.1-t2v-14b", "--base-frames", "97"]);
    assert_ne!(code, 0);
    assert!(err.contains("--base-frames") && err.contains("not a diffusion-forcing model"), "{err}");
    let (code, _, err) = tessera(&["plan", "--model", "wan2.1-t2v-14b", "--ar-step", "5"]);
    assert_ne!(code, 0);
    assert!(err.contains("--ar-step") && err.contains("not a diffusion-forcing model"), "{err}");
    let (code, _, err) = tessera(&["plan", "--model", "skyreels-v2-df-1.3b", "--frames", "81", "--base-frames", "41", "--overlap-frames", "41"]);
    assert_ne!(code, 0);
    assert!(err.contains("--overlap-frames"), "{err}");
}
