//! `tessera-worker`: a shard worker process: `serve` runs the internal gRPC API that the
//! coordinator drives; `forward` runs one rank of a sequence-parallel transformer forward over TCP
//! on saved inputs.

mod serve;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_kernels::Tensor;
use tessera_worker::model::DitModel;
use tessera_worker::parallel::{ParallelPlan, ShardContext, TcpOptions, TcpTransport};
use tessera_worker::weights::SafetensorsFile;
use tessera_worker::DitInputs;

/// Tessera shard worker.
#[derive(Parser)]
#[command(name = "tessera-worker", version, about)]
struct Cli {
    /// CPU threads for compute (0 = one per core).
    #[arg(long, global = true, env = "TESSERA_THREADS", default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the internal gRPC API (jobs prepared, stepped and decoded by the coordinator).
    Serve(Box<serve::ServeArgs>),
    /// One transformer forward on saved inputs, alone or as one rank of a TCP group.
    Forward(ForwardArgs),
}

/// Arguments of `tessera-worker forward`.
#[derive(Args)]
struct ForwardArgs {
    /// A diffusers transformer folder (`config.json` + safetensors).
    #[arg(long, env = "TESSERA_MODEL")]
    model: PathBuf,
    /// A safetensors file with `hidden_states`, `timestep`, `encoder_hidden_states` and, for
    /// image-to-video, `encoder_hidden_states_image` (the layout of the golden `io.safetensors`).
    #[arg(long, env = "TESSERA_INPUTS")]
    inputs: PathBuf,
    /// Where to write the velocity (safetensors, tensor `output`).
    #[arg(long, env = "TESSERA_OUTPUT")]
    output: PathBuf,
    /// This process's rank in the group.
    #[arg(long, env = "TESSERA_RANK", default_value_t = 0)]
    rank: usize,
    /// Every rank's address, in rank order (this rank listens on its own); none = one process.
    #[arg(long, env = "TESSERA_PEERS", value_delimiter = ',')]
    peers: Vec<SocketAddr>,
    /// Ulysses (all-to-all) degree; the rest of the ranks form rings.
    #[arg(long, env = "TESSERA_ULYSSES", default_value_t = 1)]
    ulysses: usize,
    /// Identifier shared by the ranks of one group; peers with another are refused.
    #[arg(long, env = "TESSERA_SESSION", default_value_t = 0)]
    session: u64,
    /// A secret shared by the ranks of one group: each proves it holds it when it connects
    /// (without one, any process that knows the session may join: loopback only).
    #[arg(long, env = "TESSERA_GROUP_SECRET", hide_env_values = true)]
    group_secret: Option<String>,
    /// Seconds to wait for the other ranks to connect.
    #[arg(long, env = "TESSERA_CONNECT_TIMEOUT_S", default_value_t = 30)]
    connect_timeout_s: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result =
        tessera_kernels::threads::init_threads(cli.threads).map_err(|e| anyhow::anyhow!("--threads {}: {e}", cli.threads)).and_then(|()| match cli.command {
            Command::Forward(a) => forward(a),
            Command::Serve(a) => serve::serve(*a),
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn read_tensor(io: &SafetensorsFile, name: &str) -> Result<Tensor> {
    let (shape, data) = io.read_f32(name)?;
    Ok(Tensor::new(shape, data)?)
}

fn forward(a: ForwardArgs) -> Result<()> {
    let model = DitModel::load(&a.model, tessera_kernels::Device::Cpu).with_context(|| format!("--model {}", a.model.display()))?;
    let io = SafetensorsFile::open(&a.inputs).with_context(|| format!("--inputs {}", a.inputs.display()))?;
    let hidden = read_tensor(&io, "hidden_states").context("--inputs")?;
    let (_, timesteps) = io.read_f32("timestep").context("--inputs")?;
    let text = read_tensor(&io, "encoder_hidden_states").context("--inputs")?;
    let image = if io.contains("encoder_hidden_states_image") { Some(read_tensor(&io, "encoder_hidden_states_image")?) } else { None };
    let inputs = DitInputs {
        hidden_states: &hidden,
        timesteps: &timesteps,
        encoder_hidden_states: &text,
        encoder_hidden_states_image: image.as_ref(),
        // diffusion-forcing inputs (`fps`, a timestep per frame) as the golden cases give them
        options: tessera_worker::golden::forward_options(&io).context("--inputs")?,
    };

    let start = Instant::now();
    let (out, report) = if a.peers.len() <= 1 {
        if a.rank != 0 {
            bail!("--rank {} without --peers: a single process is rank 0", a.rank);
        }
        (model.forward(&inputs)?, serde_json::json!({ "ranks": 1 }))
    } else {
        if a.rank >= a.peers.len() {
            bail!("--rank {} is outside the {} addresses of --peers", a.rank, a.peers.len());
        }
        let plan = ParallelPlan::new(a.peers.len(), a.ulysses, model.config().num_attention_heads).context("--ulysses")?;
        let secret = a.group_secret.clone().unwrap_or_default().into_bytes();
        let opts = TcpOptions { session: a.session, secret, connect_timeout: Duration::from_secs(a.connect_timeout_s), ..Default::default() };
        let transport = TcpTransport::establish(a.rank, &a.peers, opts)?;
        let ctx = ShardContext::new(Arc::new(transport), plan)?;
        let out = ctx.forward(&model, &inputs)?;
        let c = ctx.world().stats();
        let (compute, ring_wait, all_to_all) = ctx.timings().seconds();
        let report = serde_json::json!({
            "ranks": plan.ranks(), "ulysses": plan.ulysses, "ring": plan.ring, "rank": a.rank,
            "bytes_sent": { "ring": c.ring, "all_to_all": c.all_to_all, "all_gather": c.all_gather, "broadcast": c.broadcast },
            "bytes_received": c.received,
            "attention_s": compute, "ring_wait_s": ring_wait, "all_to_all_s": all_to_all,
        });
        (out, report)
    };
    let elapsed = start.elapsed().as_secs_f64();
    write_output(&a.output, &out).with_context(|| format!("--output {}", a.output.display()))?;
    let mut report = report;
    report["forward_s"] = serde_json::json!(elapsed);
    println!("{report}");
    Ok(())
}

fn write_output(path: &std::path::Path, t: &Tensor) -> Result<()> {
    let bytes: Vec<u8> = t.data().iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape().to_vec(), &bytes)?;
    safetensors::tensor::serialize_to_file([("output", view)], None, path)?;
    Ok(())
}
