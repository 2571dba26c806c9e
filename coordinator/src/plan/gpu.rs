//! The hardware the planner predicts for: each GPU kind's datasheet figures (bf16 dense tensor
//! FLOP/s, memory, HBM and link bandwidth) and where its one achieved-efficiency factor comes
//! from; `cpu` is measured on the machine that plans.

/// Where a device kind's achieved-efficiency factor comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EfficiencySource {
    /// Fitted to the one published single-GPU figure of this index in
    /// [`super::calibration::PUBLISHED`].
    Published(usize),
    /// No published figure for this kind: the factor of the named kind (same software, same
    /// generation of kernels) is assumed.
    SameAs(&'static str),
    /// The figures were measured on this machine: they are achieved rates (factor 1).
    Measured,
}

/// One kind of device, as the planner models it.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuKind {
    /// Name as `--gpu` takes it (`h100-80gb`, ..., `cpu`).
    pub name: String,
    /// What it is, for people.
    pub label: String,
    /// Peak dense bf16 tensor FLOP/s (for `cpu`: measured f32 GEMM FLOP/s).
    pub peak_flops: f64,
    /// Device memory in bytes (as the driver reports it).
    pub memory_bytes: u64,
    /// Memory bandwidth, bytes/s.
    pub hbm_bytes_per_s: f64,
    /// Bandwidth between devices of one node, per device and direction, bytes/s (NVLink through
    /// NVSwitch; PCIe where there is no NVLink; memory for in-process CPU workers).
    pub intra_bytes_per_s: f64,
    /// Whether the node's devices talk over NVLink (else PCIe or memory).
    pub nvlink: bool,
    /// Network bandwidth between nodes, per device and direction, bytes/s.
    pub network_bytes_per_s: f64,
    /// Host-to-device bandwidth (PCIe), bytes/s: what loading the text encoder for a job costs.
    pub host_bytes_per_s: f64,
    /// Devices per node.
    pub per_node: u32,
    /// Where the efficiency factor comes from.
    pub efficiency: EfficiencySource,
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// One GPU kind from its datasheet figures (NVIDIA's product pages: dense bf16 tensor FLOP/s,
/// memory, HBM bandwidth, NVLink per direction, PCIe per direction; the network is the usual one
/// NIC per GPU of such systems).
#[allow(clippy::too_many_arguments)]
fn datasheet(
    name: &str,
    label: &str,
    tflops: f64,
    memory_mib: u64,
    hbm_tb_s: f64,
    intra_gb_s: f64,
    nvlink: bool,
    network_gb_s: f64,
    pcie_gb_s: f64,
    efficiency: EfficiencySource,
) -> GpuKind {
    GpuKind {
        name: name.into(),
        label: label.into(),
        peak_flops: tflops * 1e12,
        memory_bytes: memory_mib * MIB,
        hbm_bytes_per_s: hbm_tb_s * 1e12,
        intra_bytes_per_s: intra_gb_s * 1e9,
        nvlink,
        network_bytes_per_s: network_gb_s * 1e9,
        host_bytes_per_s: pcie_gb_s * 1e9,
        per_node: 8,
        efficiency,
    }
}

/// The GPU kinds `--gpu` knows by name.
pub const GPU_NAMES: [&str; 6] = ["h100-80gb", "h200", "h20", "a100-80gb", "l40s", "cpu"];

/// The GPU kind named `name` (every name in [`GPU_NAMES`] but `cpu`, which is measured: see
/// [`GpuKind::cpu`]).
pub fn gpu_kind(name: &str) -> Option<GpuKind> {
    use EfficiencySource::{Published, SameAs};
    // NVLink 4 (H100, H200, H20): 900 GB/s both ways, 450 per direction; NVLink 3 (A100): 300.
    // Networks: 400 Gb/s NDR per GPU on Hopper systems, 200 Gb/s HDR on A100 and L40S systems.
    // Host links: PCIe 5.0 x16 (64 GB/s) on Hopper, PCIe 4.0 x16 (32 GB/s) before.
    Some(match name {
        "h100-80gb" => datasheet(name, "NVIDIA H100 SXM 80 GB", 989.4, 81_559, 3.35, 450.0, true, 50.0, 64.0, Published(0)),
        "h200" => datasheet(name, "NVIDIA H200 SXM 141 GB", 989.4, 143_771, 4.8, 450.0, true, 50.0, 64.0, Published(8)),
        "h20" => datasheet(name, "NVIDIA H20 96 GB", 148.0, 97_871, 4.0, 450.0, true, 50.0, 64.0, Published(4)),
        "a100-80gb" => datasheet(name, "NVIDIA A100 SXM 80 GB", 312.0, 81_920, 2.039, 300.0, true, 25.0, 32.0, SameAs("h100-80gb")),
        // no NVLink: peers over PCIe 4.0 x16
        "l40s" => datasheet(name, "NVIDIA L40S 48 GB", 362.05, 46_068, 0.864, 32.0, false, 25.0, 32.0, SameAs("h100-80gb")),
        _ => return None,
    })
}

impl GpuKind {
    /// This machine's CPU as a device: `flops` and `memory_bytes_per_s` measured by the caller,
    /// `memory_bytes` its memory; workers on one machine exchange through memory, machines
    /// through a 10 Gb/s network.
    pub fn cpu(flops: f64, memory_bytes_per_s: f64, memory_bytes: u64) -> Self {
        Self {
            name: "cpu".into(),
            label: format!("this machine's CPU (measured: {:.0} GFLOP/s f32, {:.1} GB/s)", flops / 1e9, memory_bytes_per_s / 1e9),
            peak_flops: flops,
            memory_bytes,
            hbm_bytes_per_s: memory_bytes_per_s,
            intra_bytes_per_s: memory_bytes_per_s,
            nvlink: false,
            network_bytes_per_s: 1.25e9,
            host_bytes_per_s: memory_bytes_per_s,
            per_node: 1,
            efficiency: EfficiencySource::Measured,
        }
    }

    /// The kind a worker's device string names (`cuda:0 NVIDIA H100 80GB HBM3`, `cpu`), by its
    /// product name; `None` for devices the planner has no figures for.
    pub fn from_device(device: &str) -> Option<Self> {
        let d = device.to_ascii_lowercase();
        let name = if d.contains("h200") {
            "h200"
        } else if d.contains("h100") {
            "h100-80gb"
        } else if d.contains("h20") {
            "h20"
        } else if d.contains("a100") {
            "a100-80gb"
        } else if d.contains("l40s") {
            "l40s"
        } else {
            return None;
        };
        gpu_kind(name)
    }

    /// Memory a job may use: all but a reserve for the runtime's context and the allocator's
    /// slack (5 %, at least 1 GiB).
    pub fn usable_bytes(&self) -> u64 {
        self.memory_bytes.saturating_sub((self.memory_bytes / 20).max(GIB))
    }

    /// Bandwidth of a group of `ranks` devices placed on whole nodes: inside a node when the
    /// group fits one, else the network.
    pub fn link_bytes_per_s(&self, ranks: u32) -> f64 {
        if ranks <= self.per_node {
            self.intra_bytes_per_s
        } else {
            self.network_bytes_per_s
        }
    }

    /// Name of the link a group of `ranks` uses.
    pub fn link_name(&self, ranks: u32) -> &'static str {
        match (ranks <= self.per_node, self.nvlink) {
            (true, true) => "nvlink",
            (true, false) if self.name == "cpu" => "memory",
            (true, false) => "pcie",
            (false, _) => "network",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_gpu_is_known_and_read_from_devices() {
        for name in GPU_NAMES.iter().filter(|n| **n != "cpu") {
            let g = gpu_kind(name).unwrap();
            assert_eq!(g.name, *name);
            assert!(g.usable_bytes() < g.memory_bytes && g.usable_bytes() > g.memory_bytes / 2);
        }
        assert_eq!(GpuKind::from_device("cuda:0 NVIDIA H100 80GB HBM3").unwrap().name, "h100-80gb");
        assert_eq!(GpuKind::from_device("cuda:3 NVIDIA H200").unwrap().name, "h200");
        assert_eq!(GpuKind::from_device("cuda:0 NVIDIA H20").unwrap().name, "h20");
        assert!(GpuKind::from_device("cpu").is_none());
        let l40s = gpu_kind("l40s").unwrap();
        assert_eq!((l40s.link_name(8), l40s.link_name(16)), ("pcie", "network"));
    }
}
