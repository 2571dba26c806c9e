//! Sampler configuration: read from a diffusers `scheduler/scheduler_config.json`
//! (`UniPCMultistepScheduler` with flow sigmas, or `FlowMatchEulerDiscreteScheduler`), with every
//! setting this project does not reproduce refused by name, and overridable shift and kind.

use super::SamplerKind;
use crate::{Result, WorkerError};
use serde_json::{Map, Value};
use std::path::Path;

/// UniPC's solver variant (`solver_type`): the B(h) function of the UniPC paper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverType {
    /// B(h) = h (`bh1`).
    Bh1,
    /// B(h) = eʰ − 1 (`bh2`), diffusers' default and Wan's.
    Bh2,
}

/// The σ appended after the last step (`final_sigmas_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalSigmas {
    /// σ_N = 0: the last step lands on the data estimate (Wan's setting).
    Zero,
    /// σ_N = σ_{N−1} of the shifted grid.
    SigmaMin,
}

/// Settings specific to UniPC (ignored by Euler).
#[derive(Clone, Debug, PartialEq)]
pub struct UniPcOptions {
    /// Multistep order, 1 or 2 (`solver_order`).
    pub solver_order: usize,
    /// `solver_type`.
    pub solver_type: SolverType,
    /// Drop to first order for the last step (`lower_order_final`).
    pub lower_order_final: bool,
    /// Steps i whose following corrector (at step i + 1) is skipped (`disable_corrector`).
    pub disable_corrector: Vec<usize>,
    /// `final_sigmas_type`.
    pub final_sigmas: FinalSigmas,
}

impl Default for UniPcOptions {
    /// Wan's configuration: order 2, bh2, lower order final, corrector everywhere, σ_N = 0.
    fn default() -> Self {
        Self { solver_order: 2, solver_type: SolverType::Bh2, lower_order_final: true, disable_corrector: Vec::new(), final_sigmas: FinalSigmas::Zero }
    }
}

/// Everything a [`super::Schedule`] is built from.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// The update rule and σ grid family.
    pub kind: SamplerKind,
    /// The time shift s of `s·σ / (1 + (s−1)·σ)` (`flow_shift` for UniPC, `shift` for Euler).
    pub shift: f64,
    /// `num_train_timesteps` (1000 for Wan): model timestep = σ · this.
    pub num_train_timesteps: u32,
    /// UniPC settings.
    pub unipc: UniPcOptions,
}

impl SamplerConfig {
    /// UniPC as the Wan diffusers repositories configure it, with time shift `shift`.
    pub fn unipc(shift: f64) -> Self {
        Self { kind: SamplerKind::UniPc, shift, num_train_timesteps: 1000, unipc: UniPcOptions::default() }
    }

    /// Flow-matching Euler with time shift `shift`.
    pub fn euler(shift: f64) -> Self {
        Self { kind: SamplerKind::Euler, shift, num_train_timesteps: 1000, unipc: UniPcOptions::default() }
    }

    /// Replaces the time shift (e.g. a request's `flow_shift`). Checked when a schedule is built.
    pub fn with_shift(mut self, shift: f64) -> Self {
        self.shift = shift;
        self
    }

    /// Replaces the sampler kind, keeping shift and training timesteps: the schedule becomes the
    /// one the other diffusers scheduler builds from them.
    pub fn with_kind(mut self, kind: SamplerKind) -> Self {
        self.kind = kind;
        self
    }

    /// Reads `scheduler_config.json` (a file), or the one inside a `scheduler/` folder or a
    /// diffusers snapshot folder.
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            let direct = path.join("scheduler_config.json");
            if direct.is_file() {
                direct
            } else {
                path.join("scheduler").join("scheduler_config.json")
            }
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|source| WorkerError::Io { path: file.clone(), source })?;
        Self::from_json(&text).map_err(|e| match e {
            WorkerError::Config { detail, .. } => WorkerError::Config { path: file.display().to_string(), detail },
            other => other,
        })
    }

    /// Parses the text of a diffusers `scheduler_config.json`. Settings that change the result and
    /// are not reproduced here are errors naming the field; fields that do not affect flow sigmas
    /// (betas, timestep spacing, dynamic-shift parameters while it is off) are ignored.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| config_error(format!("not JSON: {e}")))?;
        let map = value.as_object().ok_or_else(|| config_error("expected a JSON object".into()))?;
        let fields = Fields(map);
        let class = fields.string("_class_name")?.ok_or_else(|| config_error("`_class_name` is missing".into()))?;
        let kind = match class {
            "UniPCMultistepScheduler" => SamplerKind::UniPc,
            "FlowMatchEulerDiscreteScheduler" => SamplerKind::Euler,
            other => {
                return Err(config_error(format!("`_class_name` {other:?} is not supported (UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler)")))
            }
        };
        let num_train_timesteps = fields.uint("num_train_timesteps")?.unwrap_or(1000);
        if num_train_timesteps == 0 || num_train_timesteps > u32::MAX as u64 {
            return Err(config_error(format!("`num_train_timesteps` {num_train_timesteps} must be a positive 32-bit integer")));
        }
        fields.require_false(&["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_dynamic_shifting"])?;
        fields.require_unset("shift_terminal")?;
        let config = match kind {
            SamplerKind::UniPc => {
                if fields.bool("use_flow_sigmas")? != Some(true) {
                    return Err(config_error("`use_flow_sigmas` must be true (only flow-matching sigmas are supported)".into()));
                }
                let prediction = fields.string("prediction_type")?.unwrap_or("epsilon");
                if prediction != "flow_prediction" {
                    return Err(config_error(format!("`prediction_type` {prediction:?} is not supported (flow_prediction)")));
                }
                if fields.bool("predict_x0")? == Some(false) {
                    return Err(config_error("`predict_x0` false is not supported (UniPC in data-prediction form only)".into()));
                }
                fields.require_false(&["thresholding"])?;
                fields.require_unset("solver_p")?;
                let solver_order = fields.uint("solver_order")?.unwrap_or(2);
                if !(1..=2).contains(&solver_order) {
                    return Err(config_error(format!("`solver_order` {solver_order} is not supported (1 or 2)")));
                }
                // diffusers itself maps the DPM-Solver names onto bh2.
                let solver_type = match fields.string("solver_type")?.unwrap_or("bh2") {
                    "bh1" => SolverType::Bh1,
                    "bh2" | "midpoint" | "heun" | "logrho" => SolverType::Bh2,
                    other => return Err(config_error(format!("`solver_type` {other:?} is not supported (bh1 or bh2)"))),
                };
                let final_sigmas = match fields.string("final_sigmas_type")?.unwrap_or("zero") {
                    "zero" => FinalSigmas::Zero,
                    "sigma_min" => FinalSigmas::SigmaMin,
                    other => return Err(config_error(format!("`final_sigmas_type` {other:?} is not supported (zero or sigma_min)"))),
                };
                let lower_order_final = fields.bool("lower_order_final")?.unwrap_or(true);
                if !lower_order_final && solver_order == 2 && final_sigmas == FinalSigmas::Zero {
                    return Err(config_error(
                        "`lower_order_final` false with final_sigmas_type zero makes the last second-order step divide by zero (upstream gives NaN)".into(),
                    ));
                }
                let disable_corrector = match map.get("disable_corrector") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(items)) => items
                        .iter()
                        .map(|v| v.as_u64().map(|i| i as usize).ok_or_else(|| config_error(format!("`disable_corrector` item {v} is not a step index"))))
                        .collect::<Result<Vec<_>>>()?,
                    Some(other) => return Err(config_error(format!("`disable_corrector` {other} is not a list of step indices"))),
                };
                let shift = fields.float("flow_shift")?.unwrap_or(1.0);
                let unipc = UniPcOptions { solver_order: solver_order as usize, solver_type, lower_order_final, disable_corrector, final_sigmas };
                Self { kind, shift, num_train_timesteps: num_train_timesteps as u32, unipc }
            }
            SamplerKind::Euler => {
                fields.require_false(&["invert_sigmas", "stochastic_sampling"])?;
                let shift = fields.float("shift")?.unwrap_or(1.0);
                Self { kind, shift, num_train_timesteps: num_train_timesteps as u32, unipc: UniPcOptions::default() }
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the values (shift positive and finite, training timesteps positive).
    pub fn validate(&self) -> Result<()> {
        let field = match self.kind {
            SamplerKind::UniPc => "flow_shift",
            SamplerKind::Euler => "shift",
        };
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return Err(config_error(format!("`{field}` {} must be a positive finite number", self.shift)));
        }
        if self.num_train_timesteps == 0 {
            return Err(config_error("`num_train_timesteps` must be positive".into()));
        }
        if !(1..=2).contains(&self.unipc.solver_order) {
            return Err(config_error(format!("`solver_order` {} is not supported (1 or 2)", self.unipc.solver_order)));
        }
        Ok(())
    }
}

fn config_error(detail: String) -> WorkerError {
    WorkerError::Config { path: "scheduler_config.json".into(), detail }
}

/// Typed access to the fields of a config object, with errors naming the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn wrong(name: &str, want: &str, v: &Value) -> WorkerError {
        config_error(format!("`{name}` {v} is not {want}"))
    }

    fn bool(&self, name: &str) -> Result<Option<bool>> {
        self.get(name).map(|v| v.as_bool().ok_or_else(|| Self::wrong(name, "a boolean", v))).transpose()
    }

    fn string(&self, name: &str) -> Result<Option<&str>> {
        self.get(name).map(|v| v.as_str().ok_or_else(|| Self::wrong(name, "a string", v))).transpose()
    }

    fn uint(&self, name: &str) -> Result<Option<u64>> {
        self.get(name).map(|v| v.as_u64().ok_or_else(|| Self::wrong(name, "a non-negative integer", v))).transpose()
    }

    fn float(&self, name: &str) -> Result<Option<f64>> {
        self.get(name).map(|v| v.as_f64().ok_or_else(|| Self::wrong(name, "a number", v))).transpose()
    }

    /// Each of `names` must be absent, null or false.
    fn require_false(&self, names: &[&str]) -> Result<()> {
        for name in names {
            if self.bool(name)? == Some(true) {
                return Err(config_error(format!("`{name}` true is not supported")));
            }
        }
        Ok(())
    }

    /// `name` must be absent, null, or (as diffusers tests truthiness) zero/false.
    fn require_unset(&self, name: &str) -> Result<()> {
        match self.get(name) {
            None | Some(Value::Bool(false)) => Ok(()),
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) => Ok(()),
            Some(v) => Err(config_error(format!("`{name}` {v} is not supported (must be null)"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAN_UNIPC: &str = r#"{"_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.42.1",
        "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
        "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
        "lower_order_final": true, "num_train_timesteps": 1000, "predict_x0": true,
        "prediction_type": "flow_prediction", "rescale_betas_zero_snr": false, "sample_max_value": 1.0,
        "shift_terminal": null, "sigma_max": null, "sigma_min": null, "solver_order": 2, "solver_p": null,
        "solver_type": "bh2", "steps_offset": 0, "thresholding": false, "time_shift_type": "exponential",
        "timestep_spacing": "linspace", "trained_betas": null, "use_beta_sigmas": false,
        "use_dynamic_shifting": false, "use_exponential_sigmas": false, "use_flow_sigmas": true,
        "use_karras_sigmas": false}"#;

    fn with(field: &str, value: &str) -> String {
        let mut v: Value = serde_json::from_str(WAN_UNIPC).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    fn error_of(text: &str) -> String {
        SamplerConfig::from_json(text).unwrap_err().to_string()
    }

    #[test]
    fn reads_wan_unipc_and_euler_configs() {
        let c = SamplerConfig::from_json(WAN_UNIPC).unwrap();
        assert_eq!(c, SamplerConfig::unipc(3.0));
        let e = SamplerConfig::from_json(
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0, "num_train_timesteps": 1000,
            "use_dynamic_shifting": false, "base_shift": 0.5, "max_shift": 1.15, "invert_sigmas": false, "shift_terminal": null}"#,
        )
        .unwrap();
        assert_eq!(e, SamplerConfig::euler(5.0));
        let overridden = c.with_shift(5.0).with_kind(SamplerKind::Euler);
        assert_eq!(overridden.shift, 5.0);
        assert_eq!(overridden.kind, SamplerKind::Euler);
    }

    #[test]
    fn optional_unipc_settings_are_read() {
        let c = SamplerConfig::from_json(&with("disable_corrector", "[0, 3]")).unwrap();
        assert_eq!(c.unipc.disable_corrector, vec![0, 3]);
        let c = SamplerConfig::from_json(&with("solver_type", "\"bh1\"")).unwrap();
        assert_eq!(c.unipc.solver_type, SolverType::Bh1);
        let c = SamplerConfig::from_json(&with("final_sigmas_type", "\"sigma_min\"")).unwrap();
        assert_eq!(c.unipc.final_sigmas, FinalSigmas::SigmaMin);
    }

    #[test]
    fn unsupported_settings_are_errors_naming_the_field() {
        let cases = [
            ("_class_name", "\"DDIMScheduler\""),
            ("use_flow_sigmas", "false"),
            ("prediction_type", "\"epsilon\""),
            ("solver_order", "3"),
            ("solver_type", "\"euler\""),
            ("final_sigmas_type", "\"last\""),
            ("use_karras_sigmas", "true"),
            ("use_dynamic_shifting", "true"),
            ("thresholding", "true"),
            ("shift_terminal", "0.1"),
            ("predict_x0", "false"),
            ("flow_shift", "-1.0"),
            ("flow_shift", "\"three\""),
            ("num_train_timesteps", "0"),
            ("disable_corrector", "[\"a\"]"),
            ("lower_order_final", "false"),
        ];
        for (field, value) in cases {
            let err = error_of(&with(field, value));
            assert!(err.contains(&format!("`{field}`")), "{field}={value}: {err}");
        }
        assert!(error_of("[1, 2]").contains("object"));
        assert!(error_of("{}").contains("`_class_name`"));
        let euler = r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": true}"#;
        assert!(error_of(euler).contains("`stochastic_sampling`"));
        let euler = r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 0}"#;
        assert!(error_of(euler).contains("`shift`"));
    }

    #[test]
    fn reads_from_a_file_or_a_snapshot_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("scheduler")).unwrap();
        let file = dir.path().join("scheduler/scheduler_config.json");
        std::fs::write(&file, WAN_UNIPC).unwrap();
        assert_eq!(SamplerConfig::from_path(&file).unwrap(), SamplerConfig::unipc(3.0));
        assert_eq!(SamplerConfig::from_path(dir.path()).unwrap(), SamplerConfig::unipc(3.0));
        assert_eq!(SamplerConfig::from_path(&dir.path().join("scheduler")).unwrap(), SamplerConfig::unipc(3.0));
        std::fs::write(&file, with("solver_order", "5")).unwrap();
        let err = SamplerConfig::from_path(&file).unwrap_err().to_string();
        assert!(err.contains("scheduler_config.json") && err.contains("`solver_order`"), "{err}");
        assert!(SamplerConfig::from_path(&dir.path().join("nope")).is_err());
    }
}
