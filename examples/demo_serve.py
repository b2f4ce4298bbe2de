"""Last step of `make demo`: serve the teacher and the distilled hybrid with vLLM's
OpenAI-compatible server (`mamba-hybrid serve`), ask both the same chat prompts,
print the answers side by side, then the evaluation table of the export.

    python examples/demo_serve.py RUN_DIR      # RUN_DIR as written by `mamba-hybrid distill`
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = ["What is the capital of France?", "Give me three tips for staying focused while studying.",
           "Write a haiku about the sea."]
SERVER_ARGS = ["--gpu-memory-utilization", "0.2", "--max-model-len", "2048", "--enforce-eager",
               "--max-num-seqs", "8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask_all(model_dir: Path) -> list[str]:
    """Start a server for model_dir, answer PROMPTS greedily, stop the server."""
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("mamba-hybrid")), "serve", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), *SERVER_ARGS]
    log = open(model_dir.parent / f"serve-{model_dir.name}.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server for {model_dir} exited ({server.returncode}); see {log.name}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"server for {model_dir} did not start in 300 s; see {log.name}")
            time.sleep(2)
        answers = []
        for prompt in PROMPTS:
            r = httpx.post(f"{base}/v1/chat/completions", timeout=300, json={
                "model": str(model_dir), "temperature": 0, "max_tokens": 48,
                "messages": [{"role": "user", "content": prompt}]})
            r.raise_for_status()
            answers.append(r.json()["choices"][0]["message"]["content"].strip())
        return answers
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def main() -> int:
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/demo-distill")
    teacher, hybrid = run / "teacher", run / "export"
    for d in (teacher, hybrid):
        if not (d / "config.json").is_file():
            print(f"error: {d} is not a model directory; run `mamba-hybrid distill` first", file=sys.stderr)
            return 2
    print(f"serving {teacher} and {hybrid} with vLLM (CPU engine)...", flush=True)
    answers = {"teacher": ask_all(teacher), "hybrid": ask_all(hybrid)}
    for i, prompt in enumerate(PROMPTS):
        print(f"\n### {prompt}\n--- teacher:\n{answers['teacher'][i]}\n--- hybrid (50% Mamba2, "
              f"short CPU distillation):\n{answers['hybrid'][i]}")
    eval_json = hybrid / "eval.json"
    if eval_json.is_file():
        from distillation.evaluate import TABLE_LEGEND, format_table
        print("\nheld-out evaluation (init = freshly initialised hybrid, final = distilled):")
        print(format_table(json.loads(eval_json.read_text())))
        print(TABLE_LEGEND)
    print("\nThe CPU demo distils for a few minutes only: quality needs a GPU run (examples/gpu.yaml).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
