"""Compiler flags of the CPU verify kernels (csrc/verify_cpu.cpp), shared by setup.py and
benchmarks/kernels_ab.py so that an A/B build compiles as the installed one does.
Loaded by path (runpy), without importing the package."""
import os


def cpu_flags() -> list[str]:
    """-march=native unless VLLM_MAMBA_HYBRID_MARCH says otherwise."""
    march = os.environ.get("VLLM_MAMBA_HYBRID_MARCH", "native")
    return ["-O3", "-fopenmp-simd", "-fno-math-errno", f"-march={march}"]
