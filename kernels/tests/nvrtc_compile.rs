//! Compiles every CUDA kernel source with NVRTC for sm_80 and sm_90, to machine code (what the
//! device cache loads) and to PTX, and assembles the PTX with `ptxas -v`, with no GPU: fails on any compile or assembly error, on an entry point missing from
//! the PTX, when an attention kernel (flash or wide) spills registers, and when ptxas notes that it
//! serialised a warpgroup-MMA pipeline or injected waits into it (its C75xx notes), and when the
//! attention kernels' machine code (`nvdisasm`) lost the order their overlap depends on
//! ([`SCHEDULES`]); prints registers and spills per kernel.
//!
//! Needs `libnvrtc.so` on `LD_LIBRARY_PATH` and `ptxas` on `PATH` (or in `TESSERA_PTXAS`), of the
//! same CUDA version (12.9: pip `nvidia-cuda-nvrtc-cu12`, `nvidia-cuda-nvcc-cu12`), and `nvdisasm`
//! on `PATH` (or in `TESSERA_NVDISASM`; pip `nvidia-cuda-nvdisasm`) for the schedules; `.ci/run`
//! sets them up. Without them the test skips with the reason, except under `CI=true`, where it
//! fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tessera_kernels::cuda::source::{compile_cubin, compile_ptx, nvrtc_available, KernelSource};
use tessera_kernels::cuda::Arch;

const ARCHS: [Arch; 2] = [Arch { major: 8, minor: 0 }, Arch { major: 9, minor: 0 }];

/// What `ptxas -v` reports for one kernel.
#[derive(Debug, Default, Clone)]
struct Usage {
    registers: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
    smem: u32,
}

fn ptxas_command() -> Option<PathBuf> {
    let p = std::env::var_os("TESSERA_PTXAS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("ptxas"));
    Command::new(&p).arg("--version").output().ok().filter(|o| o.status.success()).map(|_| p)
}

fn nvdisasm_command() -> Option<PathBuf> {
    let p = std::env::var_os("TESSERA_NVDISASM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("nvdisasm"));
    Command::new(&p).arg("--version").output().ok().filter(|o| o.status.success()).map(|_| p)
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Missing tools: a skip locally, a failure in CI.
fn tools_or_skip() -> Option<PathBuf> {
    let nvrtc = nvrtc_available();
    let ptxas = ptxas_command();
    if nvrtc && ptxas.is_some() {
        return ptxas;
    }
    let why = format!(
        "NVRTC {} (libnvrtc.so on LD_LIBRARY_PATH), ptxas {} (PATH or TESSERA_PTXAS); `.ci/run` shows how to install both",
        if nvrtc { "found" } else { "missing" },
        if ptxas.is_some() { "found" } else { "missing" }
    );
    if in_ci() {
        panic!("CI=true and the CUDA compile tools are missing: {why}");
    }
    eprintln!("SKIPPED nvrtc_compile: {why}");
    None
}

/// The number before `unit` in `text` (`"168 registers"` -> 168).
fn number_before(text: &str, unit: &str) -> Option<u32> {
    let i = text.find(unit)?;
    text[..i].split_whitespace().last()?.parse().ok()
}

/// Per-kernel usage from `ptxas -v` output.
fn parse_ptxas(out: &str) -> BTreeMap<String, Usage> {
    let mut usage: BTreeMap<String, Usage> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in out.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            usage.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(name), true) = (&current, line.contains("bytes stack frame")) {
            let u = usage.get_mut(name).expect("entry");
            u.stack = number_before(line, "bytes stack frame").unwrap_or(0);
            u.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            u.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if let (Some(name), true) = (&current, line.contains("Used ") && line.contains(" registers")) {
            let u = usage.get_mut(name).expect("entry");
            u.registers = number_before(line, "registers").unwrap_or(0);
            u.smem = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    usage
}

/// The order an attention kernel's overlap depends on, as it must survive ptxas: the machine code
/// of each entry, reduced to one letter per instruction that matters (runs of one letter
/// collapsed), must contain `pattern`. E: an exp2 of the softmax; H: a tensor-core MMA; 1 and 0:
/// waits for all but the newest or for every wgmma group ([`LETTERS`]).
struct Schedule {
    source: KernelSource,
    entries: &'static [&'static str],
    pattern: &'static str,
    why: &'static str,
}

// (None for the mma.sync kernel: ptxas moves its wait for V_j above the softmax and then
// interleaves the exponentials with the P·V MMAs, which suits a synchronous MMA; the head-64
// kernel reached PyTorch flash's rate on an H200 so.)
const SCHEDULES: [Schedule; 1] = [Schedule {
    source: KernelSource::FlashAttentionSm90,
    entries: &[
        "flash_attention_sm90_overlap_d64_bf16",
        "flash_attention_sm90_overlap_d64_f32",
        "flash_attention_sm90_overlap_d128_bf16",
        "flash_attention_sm90_overlap_d128_f32",
    ],
    pattern: "1E0",
    why: "the softmax of S_j runs between the wait for S_j and the wait for P_{j-1}·V_{j-1}",
}];

/// [`Schedule`]'s letters: the instruction (a substring of its SASS line) and its letter. Both
/// tensor-core MMAs, the warp's `HMMA` and the warpgroup's `HGMMA`, are `H`.
const LETTERS: [(&str, char); 5] =
    [("MUFU.EX2", 'E'), ("HMMA", 'H'), ("HGMMA", 'H'), ("WARPGROUP.DEPBAR.LE gsb0, 0x1", '1'), ("WARPGROUP.DEPBAR.LE gsb0, 0x0", '0')];

/// Each function's instructions, reduced to [`Schedule`]'s letters, from `nvdisasm` of `cubin`.
fn schedule_letters(nvdisasm: &Path, cubin: &Path) -> BTreeMap<String, String> {
    let out = Command::new(nvdisasm).arg(cubin).output().expect("run nvdisasm");
    assert!(out.status.success(), "nvdisasm {}: {}", cubin.display(), String::from_utf8_lossy(&out.stderr));
    let mut letters: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix(".text.").and_then(|n| n.strip_suffix(':')) {
            current = Some(name.to_string());
            continue;
        }
        let Some(name) = &current else { continue };
        let Some(&(_, letter)) = LETTERS.iter().find(|(op, _)| t.contains(op)) else { continue };
        let seq = letters.entry(name.clone()).or_default();
        if !seq.ends_with(letter) {
            seq.push(letter);
        }
    }
    letters
}

fn assemble(ptxas: &Path, ptx: &Path, target: &str) -> (bool, String) {
    let cubin = ptx.with_extension("cubin");
    let out = Command::new(ptxas).arg(format!("-arch={target}")).arg("-v").arg(ptx).arg("-o").arg(&cubin).output().expect("run ptxas");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn every_kernel_compiles_and_assembles_for_sm80_and_sm90() {
    let Some(ptxas) = tools_or_skip() else { return };
    // The machine-code schedule checks need nvdisasm (pip `nvidia-cuda-nvdisasm`); CI has it.
    let nvdisasm = nvdisasm_command();
    match &nvdisasm {
        None if in_ci() => panic!("CI=true and nvdisasm is missing (PATH or TESSERA_NVDISASM): the schedule checks need it"),
        None => eprintln!("nvdisasm missing (PATH or TESSERA_NVDISASM): the attention kernels' schedules are not checked"),
        Some(_) => {}
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nvrtc-ptx");
    std::fs::create_dir_all(&dir).expect("ptx dir");
    let mut failures = Vec::new();
    let mut table = Vec::new();
    for arch in ARCHS {
        for src in KernelSource::ALL {
            // A source built for one architecture alone (the warpgroup-MMA attention: sm_90a) is
            // compiled for it there and for nothing else.
            let Some(target) = src.target(arch) else { continue };
            let ptx = match compile_ptx(src, arch) {
                Ok(p) => p,
                Err(e) => {
                    failures.push(format!("{arch} {}: {e}", src.file_name()));
                    continue;
                }
            };
            let path = dir.join(format!("{}.{target}.ptx", src.file_name().trim_end_matches(".cu")));
            // What the device cache loads: machine code straight from NVRTC, an ELF image (kept
            // beside the PTX: its schedule is the one checked below).
            let nvrtc_cubin = path.with_extension("nvrtc.cubin");
            let _ = std::fs::remove_file(&nvrtc_cubin); // none from an earlier run
            match compile_cubin(src, arch) {
                Ok(cubin) if cubin.starts_with(b"\x7fELF") => std::fs::write(&nvrtc_cubin, cubin).expect("write cubin"),
                Ok(_) => failures.push(format!("{arch} {}: NVRTC's cubin is not an ELF image", src.file_name())),
                Err(e) => failures.push(format!("{arch} {}: cubin: {e}", src.file_name())),
            }
            std::fs::write(&path, ptx.to_src()).expect("write ptx");
            let (ok, log) = assemble(&ptxas, &path, &target);
            if !ok {
                failures.push(format!("{arch} {}: ptxas failed:\n{log}", src.file_name()));
                continue;
            }
            if log.contains("warning") {
                eprintln!("ptxas warnings for {} at {arch}:\n{log}", src.file_name());
            }
            // ptxas's C75xx notes: it serialised the warpgroup MMAs, or injected a wait or an
            // arrive because registers a wgmma owns were touched in flight. Either undoes the
            // overlap the kernel is written for, silently, so it fails here.
            let wgmma_notes: Vec<&str> = log.lines().filter(|l| l.contains("(C75")).collect();
            if !wgmma_notes.is_empty() {
                failures.push(format!("{arch} {}: ptxas rewrote the wgmma pipeline:\n{}", src.file_name(), wgmma_notes.join("\n")));
            }
            if let Some(nvdisasm) = nvdisasm.as_ref().filter(|_| nvrtc_cubin.exists()) {
                for sched in SCHEDULES.iter().filter(|sc| sc.source == src) {
                    let letters = schedule_letters(nvdisasm, &nvrtc_cubin);
                    for &entry in sched.entries {
                        let seq = letters.get(entry).map(String::as_str).unwrap_or_default();
                        if !seq.contains(sched.pattern) {
                            failures.push(format!("{arch} {entry}: the compiler reordered the schedule ({}): no '{}' in {seq}", sched.why, sched.pattern));
                        }
                    }
                }
            }
            let usage = parse_ptxas(&log);
            for &entry in src.entry_points() {
                match usage.get(entry) {
                    None => failures.push(format!("{arch} {}: entry point {entry} not in the PTX", src.file_name())),
                    Some(u) => {
                        if matches!(src, KernelSource::FlashAttention | KernelSource::FlashAttentionSm90 | KernelSource::WideAttention)
                            && (u.spill_stores > 0 || u.spill_loads > 0)
                        {
                            failures.push(format!("{arch} {entry} spills registers: {} bytes stored, {} loaded", u.spill_stores, u.spill_loads));
                        }
                        table.push((arch, entry, u.clone()));
                    }
                }
            }
        }
    }
    println!("{:<7} {:<40} {:>5} {:>6} {:>7} {:>7} {:>6}", "arch", "kernel", "regs", "stack", "spill-s", "spill-l", "smem");
    for (arch, entry, u) in &table {
        println!("{:<7} {:<40} {:>5} {:>6} {:>7} {:>7} {:>6}", arch.to_string(), entry, u.registers, u.stack, u.spill_stores, u.spill_loads, u.smem);
    }
    println!("PTX and cubins in {}", dir.display());
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn a_broken_kernel_is_reported_with_the_compiler_log() {
    if tools_or_skip().is_none() {
        return;
    }
    // The same path the device cache uses, fed a source with an error: the log must come back.
    let opts = tessera_kernels::cuda::source::compile_options(&ARCHS[1].to_string());
    let err = cudarc::nvrtc::compile_ptx_with_opts("extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }", opts).unwrap_err();
    assert!(format!("{err:?}").contains("undefined_name"), "{err:?}");
}
