//! [`TelemetryArgs`]: the tracing flags both servers take (`--otlp-endpoint`,
//! `--trace-sample-ratio`), each also an environment variable.

use crate::TelemetryError;
use clap::Args;

/// Where and how much to trace; flattened into `tessera serve` and `tessera-worker serve`.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct TelemetryArgs {
    /// OTLP/gRPC collector to export spans to (e.g. http://otel-collector:4317); unset: no export.
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces recorded, 0 to 1; a trace begun by the caller follows its choice.
    #[arg(long = "trace-sample-ratio", env = "TESSERA_TRACE_SAMPLE_RATIO", value_name = "RATIO", default_value_t = 1.0, value_parser = parse_sample_ratio)]
    pub trace_sample_ratio: f64,
    /// With an https:// collector: the CA certificate (PEM) that signed the collector's (default:
    /// the system's roots).
    #[arg(long = "otlp-certificate", env = "OTEL_EXPORTER_OTLP_CERTIFICATE", value_name = "PEM")]
    pub otlp_certificate: Option<std::path::PathBuf>,
    /// With an https:// collector that requires one: this process's client certificate (PEM).
    #[arg(long = "otlp-client-certificate", env = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", value_name = "PEM")]
    pub otlp_client_certificate: Option<std::path::PathBuf>,
    /// The private key of --otlp-client-certificate (PEM).
    #[arg(long = "otlp-client-key", env = "OTEL_EXPORTER_OTLP_CLIENT_KEY", value_name = "PEM")]
    pub otlp_client_key: Option<std::path::PathBuf>,
}

impl Default for TelemetryArgs {
    fn default() -> Self {
        Self { otlp_endpoint: None, trace_sample_ratio: 1.0, otlp_certificate: None, otlp_client_certificate: None, otlp_client_key: None }
    }
}

impl TelemetryArgs {
    /// The flags as the environment sets them (`OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// `TESSERA_TRACE_SAMPLE_RATIO`), for a command that has no such flags (the CLI client).
    pub fn from_env() -> Result<Self, TelemetryError> {
        let otlp_endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok();
        let trace_sample_ratio = match std::env::var("TESSERA_TRACE_SAMPLE_RATIO") {
            Ok(v) => parse_sample_ratio(&v).map_err(|_| TelemetryError::InvalidSampleRatio { value: v.trim().parse().unwrap_or(f64::NAN) })?,
            Err(_) => 1.0,
        };
        let path = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
        Ok(Self {
            otlp_endpoint,
            trace_sample_ratio,
            otlp_certificate: path("OTEL_EXPORTER_OTLP_CERTIFICATE"),
            otlp_client_certificate: path("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
            otlp_client_key: path("OTEL_EXPORTER_OTLP_CLIENT_KEY"),
        })
    }

    /// The endpoint, if one is set (an empty value counts as unset, as OpenTelemetry's own
    /// variables do).
    pub fn endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty())
    }

    /// Checks the values (the flag parser already does; this covers values built in code).
    pub fn validate(&self) -> Result<(), TelemetryError> {
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return Err(TelemetryError::InvalidSampleRatio { value: self.trace_sample_ratio });
        }
        Ok(())
    }
}

/// Parses a sampling ratio: a number from 0 to 1.
pub fn parse_sample_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} must be a number from 0 to 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        t: TelemetryArgs,
    }

    #[test]
    fn sample_ratios_are_checked_and_errors_name_the_flag() {
        assert_eq!(parse_sample_ratio("0"), Ok(0.0));
        assert_eq!(parse_sample_ratio(" 0.25 "), Ok(0.25));
        assert_eq!(parse_sample_ratio("1"), Ok(1.0));
        for bad in ["1.5", "-0.1", "NaN", "inf", "half", ""] {
            assert!(parse_sample_ratio(bad).is_err(), "{bad:?} accepted");
        }
        let cli = Cli::try_parse_from(["x", "--trace-sample-ratio", "0.5", "--otlp-endpoint", "http://c:4317"]).unwrap();
        assert_eq!(cli.t, TelemetryArgs { otlp_endpoint: Some("http://c:4317".into()), trace_sample_ratio: 0.5, ..Default::default() });
        let err = Cli::try_parse_from(["x", "--trace-sample-ratio", "2"]).err().unwrap().to_string();
        assert!(err.contains("--trace-sample-ratio") && err.contains("from 0 to 1"), "{err}");
        let err = TelemetryArgs { trace_sample_ratio: 1.01, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(err.starts_with("--trace-sample-ratio 1.01"), "{err}");
        assert!(TelemetryArgs::default().validate().is_ok());
    }

    #[test]
    fn an_empty_endpoint_means_no_export() {
        let t = |e: &str| TelemetryArgs { otlp_endpoint: Some(e.into()), ..Default::default() };
        assert_eq!(t("").endpoint(), None);
        assert_eq!(t("  ").endpoint(), None);
        assert_eq!(t(" http://c:4317 ").endpoint(), Some("http://c:4317"));
        assert_eq!(TelemetryArgs::default().endpoint(), None);
    }
}
