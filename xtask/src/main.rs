//! Sheaf's automation, run as `cargo xtask <command>` (aliased in `.cargo/config.toml`).
//!
//! - `demo`: builds the host and plugins in release, trains the GPT example
//!   (`examples/shakespeare-gpt.toml`) on 2 workers and prints a sample of its text;
//!   extra arguments go to `sheaf launch` in place of the example.
//! - `ci`: formatting check, clippy with warnings denied, the CUDA feature's compile
//!   check, then `test`. What `.ci/run` runs.
//! - `check-cuda [--nvcc]`: `cargo check` of the candle plugin with `--features cuda`
//!   (no GPU needed), in a target directory of its own. By default candle's CUDA
//!   kernels are not compiled: a stand-in `nvcc` writes empty PTX, so the check is of
//!   the Rust code (Sheaf's and candle's) under the feature, in about 3 minutes;
//!   `--nvcc` compiles the kernels with NVIDIA's compiler installed from PyPI into
//!   `target/cuda/venv` (about 10 minutes more on 2 cores).
//! - `test`: builds the whole workspace (the `sheaf` binary, every plugin `.so`, the
//!   test fixtures), then runs every test: in parallel, then the e2e tests that
//!   measure time (ignored in the parallel run) one at a time, and the unit tests of
//!   the patched zeromq in `third_party/`.
//! - `tidy`: the repository conventions (also run as a test).
//! - `size`: every crate's lines of code and of tests, its dependencies and its largest
//!   non-test file.
//! - `new-plugin NAME --kind KIND [--path DIR] [--git URL]`: an out-of-tree plugin
//!   crate that builds and passes `sheaf plugin check` as generated (docs/plugins.md).
//! - `perf [--record] [--rounds R]`: the performance regression guard (`perf.rs`):
//!   collectives per transport and the reference jobs as ratios against memcpy and MPI
//!   measured in the same run, compared with `benches/perf/last.json`. Not in CI.

mod new_plugin;
mod perf;
mod size;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("ci") => ci(&root),
        Some("demo") => demo(&root, &args[1..]),
        Some("check-cuda") => check_cuda(&root, args.get(1).is_some_and(|a| a == "--nvcc")),
        Some("test") => test(&root, &args[1..]),
        Some("new-plugin") => new_plugin::new_plugin(&root, &args[1..]),
        Some("perf") => perf::perf(&root, &args[1..]),
        Some("size") => {
            print!("{}", size::report(&root)?);
            Ok(())
        }
        Some("tidy") => {
            let problems = tidy::check(&root)?;
            if problems.is_empty() {
                println!("tidy: ok");
                Ok(())
            } else {
                bail!("tidy found {} problem(s):\n{}", problems.len(), problems.join("\n"))
            }
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <demo [launch args] | ci | test [cargo test args] | check-cuda [--nvcc] | tidy | size | perf [--record] [--rounds R] | \
                 new-plugin NAME --kind KIND [--path DIR] [--git URL]>"
            );
            std::process::exit(2)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root").to_path_buf()
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(cargo).args(args).current_dir(root).status().context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    cargo(root, &["build", "--workspace"])?;
    // Unit, binary and integration tests; no doc tests, which the workspace has none of
    // (tidy refuses a code block in a doc comment), and which cost a rustdoc run per
    // crate.
    let mut args = vec!["test", "--workspace", "--lib", "--bins", "--tests"];
    args.extend(extra.iter().map(String::as_str));
    cargo(root, &args)?;
    // Tests that measure time need the machine to themselves: ignored in the parallel
    // run above, run here one at a time.
    if extra.is_empty() {
        // `--workspace`, as above: the same features, so the test binary is not rebuilt.
        cargo(root, &["test", "--workspace", "--test", "e2e", "--", "--ignored", "--test-threads=1"])?;
        // The patched zeromq (third_party/README.md) is outside the workspace: its own
        // unit tests, the patch's among them, with the features the transport uses.
        cargo(
            root,
            &[
                "test",
                "--manifest-path",
                "third_party/zeromq/Cargo.toml",
                "--target-dir",
                "target/third_party",
                "--lib",
                "--no-default-features",
                "--features",
                "tokio-runtime,all-transport",
            ],
        )?;
    }
    Ok(())
}

fn ci(root: &Path) -> Result<()> {
    cargo(root, &["fmt", "--all", "--", "--check"])?;
    cargo(root, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    test(root, &[])?;
    check_cuda(root, false)
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

/// The README's first command: the GPT example on 2 workers, then a sample of what it
/// learned and what the numbers mean. Extra arguments go to `sheaf launch` in place of
/// the example job. Builds only what the demo runs (the host and the plugins, the
/// workspace's default members) in release: the workers train about 2.6x faster than
/// in the dev profile, for a build of about the same length.
fn demo(root: &Path, extra: &[String]) -> Result<()> {
    eprintln!("building sheaf and its plugins (release; the first build takes a few minutes)");
    cargo(root, &["build", "--release"])?;
    let sheaf = target_dir(root).join("release").join("sheaf");
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let run_dir = root.join("runs").join(format!("demo-{secs}"));
    let mut args = vec!["launch".to_string(), "-n".into(), "2".into()];
    if extra.is_empty() {
        args.push("examples/shakespeare-gpt.toml".into());
    }
    args.extend(extra.iter().cloned());
    args.extend(["--run-dir".into(), run_dir.display().to_string()]);
    eprintln!("$ {} {}", sheaf.display(), args.join(" "));
    let status = Command::new(&sheaf).args(&args).current_dir(root).status().context("running sheaf")?;
    if !status.success() {
        bail!("the demo failed ({status})");
    }
    if run_dir.join("vocab.json").exists() {
        let sample = ["sample", &run_dir.display().to_string(), "--prompt", "ROMEO:", "--tokens", "300"];
        eprintln!("$ {} {}", sheaf.display(), sample.join(" "));
        let status =
            Command::new(&sheaf).args(sample).current_dir(root).status().context("running sheaf sample")?;
        if !status.success() {
            bail!("sampling failed ({status})");
        }
        eprintln!(
            "\nval_loss is the mean cross-entropy, in nats, of predicting each next character of \
             the held-out tenth of the plays: ln 64 = 4.16 for a uniform guess over their 64 \
             characters, about 1.9 when the model has learned spelling, words and the shape of \
             a play (speakers, line breaks). Next: `sheaf sample {0} --prompt \"KING:\"`; \
             the loss curve in {0}/loss.svg; a larger model with \
             `--set model.n_layer=6 --set model.n_embd=192`; another layout with \
             `--set 'parallel.strategy=\"pipeline\"'`; your own text with \
             `--set 'data.dataset=\"my.txt\"'`.",
            run_dir.display()
        );
        // The demo's last line: how far it got.
        let summary = std::fs::read_to_string(run_dir.join("summary.json")).unwrap_or_default();
        let val_loss = summary
            .split("\"val_loss\":")
            .nth(1)
            .and_then(|rest| rest.split([',', '\n', '}']).next())
            .and_then(|v| v.trim().parse::<f64>().ok());
        if let Some(v) = val_loss {
            println!("val_loss {v:.4} (a uniform guess: 4.16)");
        }
    }
    Ok(())
}

/// NVIDIA's CUDA 13 compiler and runtime from PyPI, in a virtualenv under target/.
const CUDA_WHEELS: &[&str] = &["nvidia-cuda-nvcc==13.5.*", "nvidia-cuda-runtime==13.5.*", "nvidia-cuda-cccl"];

/// A stand-in for `nvcc` for the compile check: empty PTX for each kernel, an empty
/// object or archive where one is asked for, and the version and architectures
/// cudaforge asks about. What it leaves out is candle's kernels' own compilation,
/// which is not Sheaf's code; the Rust code under the feature is checked as ever.
const NVCC_STAND_IN: &str = r#"#!/usr/bin/env python3
import os, sys
a = sys.argv[1:]
if "--version" in a:
    print("nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88")
elif "--list-gpu-code" in a:
    print("sm_75\nsm_80\nsm_86\nsm_89\nsm_90")
elif "--ptx" in a:
    out = a[a.index("--output-directory") + 1]
    for x in a:
        if x.endswith(".cu"):
            open(os.path.join(out, os.path.basename(x)[:-3] + ".ptx"), "w").write("// not compiled\n")
elif "-o" in a:
    open(a[a.index("-o") + 1], "wb").write(b"!<arch>\n" if "--lib" in a else b"")
"#;

/// `cargo check -p sheaf-compute-candle --features cuda`, in `target/cuda/check` (never
/// the main target directory, whose CUDA builds must have real kernels): with a
/// stand-in `nvcc` ([`NVCC_STAND_IN`]), or with NVIDIA's from PyPI (`nvcc`).
fn check_cuda(root: &Path, nvcc: bool) -> Result<()> {
    let cuda = if nvcc { pypi_cuda(root)? } else { stand_in_cuda(root)? };
    let path = format!("{}:{}", cuda.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let target = target_dir(root).join("cuda").join(if nvcc { "nvcc-check" } else { "check" });
    eprintln!(
        "$ cargo check -p sheaf-compute-candle --features cuda  ({} at {})",
        if nvcc { "NVIDIA's nvcc" } else { "a stand-in nvcc: candle's kernels not compiled" },
        cuda.display()
    );
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["check", "-p", "sheaf-compute-candle", "--features", "cuda"])
        .current_dir(root)
        .env("CARGO_TARGET_DIR", &target)
        .env("PATH", path)
        .env("NVCC", cuda.join("bin").join("nvcc"))
        .env("CUDA_HOME", &cuda)
        .env("CUDA_PATH", &cuda)
        .env("CUDA_ROOT", &cuda)
        // cudarc 0.19 knows CUDA only up to 13.4; with no GPU, name the architecture.
        .env("CUDARC_CUDA_VERSION", "13040")
        .env("CUDA_COMPUTE_CAP", "90")
        .status()
        .context("cargo check --features cuda")?;
    if !status.success() {
        bail!("the cuda feature does not compile");
    }
    Ok(())
}

/// A CUDA root whose `bin/nvcc` is the stand-in.
fn stand_in_cuda(root: &Path) -> Result<PathBuf> {
    let cuda = target_dir(root).join("cuda").join("stand-in");
    let bin = cuda.join("bin");
    std::fs::create_dir_all(&bin).context("creating the stand-in CUDA root")?;
    let nvcc = bin.join("nvcc");
    std::fs::write(&nvcc, NVCC_STAND_IN).context("writing the stand-in nvcc")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&nvcc, std::fs::Permissions::from_mode(0o755))
        .context("making nvcc executable")?;
    Ok(cuda)
}

/// NVIDIA's CUDA compiler from PyPI, in a virtualenv under target/: its CUDA root.
fn pypi_cuda(root: &Path) -> Result<PathBuf> {
    let venv = target_dir(root).join("cuda").join("venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        let status =
            Command::new("python3").args(["-m", "venv"]).arg(&venv).status().context("python3 -m venv")?;
        if !status.success() {
            bail!("creating {} failed", venv.display());
        }
    }
    let status = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(CUDA_WHEELS)
        .status()
        .context("pip install")?;
    if !status.success() {
        bail!("installing NVIDIA's CUDA compiler from PyPI failed");
    }
    let out = Command::new(&python)
        .args(["-c", "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))"])
        .output()
        .context("locating the CUDA install")?;
    let cuda = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    if !cuda.join("bin").join("nvcc").exists() {
        bail!("no nvcc under {}", cuda.display());
    }
    Ok(cuda)
}
