"""Builders of small real checkpoints for the tests (random weights, real files)."""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distillation.paths import default_data_dir
from vllm_mamba_hybrid import LlamaMambaHybridConfig, LlamaMambaHybridForCausalLM

REPO = Path(__file__).resolve().parents[1]
SHARED = default_data_dir().parent  # the directory that holds data/

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the shared essays, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    texts = [p.read_text(encoding="utf-8") for p in sorted((default_data_dir() / "essays").glob("*.txt"))[:8]]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def _sharpen(model: torch.nn.Module, scale: float) -> None:
    """Scale matrices so random models have confident (non-tied) greedy choices."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "conv1d" not in name:
                p.mul_(scale)


def tiny_llama_config(*, num_layers=4, hidden_size=64, heads=4, kv_heads=2, vocab_size=512,
                      intermediate_size=128, tie_word_embeddings=False, **extra) -> LlamaConfig:
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ids.update(extra)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                       intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=tie_word_embeddings, **ids)


def make_random_llama(out_dir, *, seed=0, tokenizer=True, dtype=torch.float32, scale=1.0,
                      **config_kw) -> LlamaForCausalLM:
    """A tiny random Llama teacher directory (with a real BPE tokenizer + chat template)."""
    torch.manual_seed(seed)
    if tokenizer:
        tok = make_tokenizer(out_dir, vocab_size=config_kw.get("vocab_size", 512))
        config_kw.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    cfg = tiny_llama_config(**config_kw)
    model = LlamaForCausalLM(cfg)
    _sharpen(model, scale)
    model.to(dtype).save_pretrained(out_dir)
    return model


def random_kd_examples(n: int, *, prompt: tuple[int, int], answer: tuple[int, int],
                       vocab: int = 512, seed: int = 0) -> list[dict]:
    """Distillation examples of random tokens, prompt and answer lengths drawn in [lo, hi)."""
    rng = random.Random(seed)
    return [{"prompt_ids": [rng.randrange(3, vocab) for _ in range(rng.randrange(*prompt))],
             "answer_ids": [rng.randrange(3, vocab) for _ in range(rng.randrange(*answer))]}
            for _ in range(n)]


def make_random_hybrid(out_dir, variant: str, *, num_layers=4, attn_layers=(1, 3), seed=0,
                       dtype=torch.float32, scale=1.0, tokenizer=False,
                       **config_kw) -> LlamaMambaHybridForCausalLM:
    """A tiny random hybrid checkpoint directory (config.json + model.safetensors)."""
    torch.manual_seed(seed)
    base = tiny_llama_config(num_layers=num_layers, **config_kw).to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        base.pop(k, None)
    cfg = LlamaMambaHybridConfig(**base, attn_layers=list(attn_layers), mamba_variant=variant,
                                 ssm_chunk_size=16)
    model = LlamaMambaHybridForCausalLM(cfg)
    _sharpen(model, scale)
    model.to(dtype).save_pretrained(out_dir)
    if tokenizer:
        make_tokenizer(out_dir, vocab_size=cfg.vocab_size)
    return model


def write_paper_checkpoint(model: LlamaMambaHybridForCausalLM, out, *, fmt="bin"):
    """The layout MambaInLlama's training scripts release: teacher config + mamba_config.json."""
    cfg = model.config
    out.mkdir()
    teacher = {k: v for k, v in cfg.to_dict().items() if k in LlamaForCausalLM.config_class().to_dict()
               or k in ("head_dim",)}
    teacher.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (out / "config.json").write_text(json.dumps(teacher))
    ssm_cfg = ({"expand": 1, "ngroups": cfg.num_attention_heads, "d_state": cfg.head_dim}
               if cfg.mamba_variant == "mamba2" else {"expand": 1})
    (out / "mamba_config.json").write_text(json.dumps({
        "d_model": cfg.hidden_size, "ssm_cfg": ssm_cfg, "rms_norm_eps": cfg.rms_norm_eps,
        "vocab_size": cfg.vocab_size, "d_inner": cfg.d_inner, "d_xb": cfg.d_xb,
        "intermediate_size": cfg.intermediate_size, "hidden_act": cfg.hidden_act,
        "n_layer": cfg.num_hidden_layers, "attn_layers": cfg.attn_layers}))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "bin":
        torch.save(state, out / "pytorch_model.bin")
    else:
        save_file(state, out / "model.safetensors")
    return out


DAMAGES = ("missing", "unexpected", "wrong_shape", "nan", "truncated")


def damaged_copy(src: Path, dst: Path, damage: str, name: str) -> tuple[str, ...]:
    """Copy the checkpoint directory ``src`` to ``dst`` with one defect in tensor ``name``
    (``DAMAGES``); returns what an error about it must name: the tensor and its file (the
    directory for a missing tensor, the file for a truncated one)."""
    from safetensors.torch import load_file
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    weights = dst / "model.safetensors"
    if damage == "missing":
        del tensors[name]
        expect = (name, str(dst))
    elif damage == "unexpected":
        name = name.rsplit(".", 1)[0] + ".stray_bias"
        tensors[name] = torch.ones(3)
        expect = (name, str(weights))
    elif damage == "wrong_shape":
        tensors[name] = tensors[name][:-1].contiguous()
        expect = (name, str(weights))
    elif damage == "nan":
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
        expect = (name, str(weights), "non-finite")
    elif damage != "truncated":
        raise ValueError(f"unknown damage {damage!r}")
    save_file(tensors, weights, metadata={"format": "pt"})
    if damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        expect = (str(weights), "unreadable")
    return expect


def first_difference(ref: list[int], got: list[int]) -> int:
    """Index of the first token where ``got`` leaves ``ref`` (or where the shorter ends)."""
    return next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))


def assert_greedy_equal(label: str, prompt_lens, refs, outs, want_lens=None) -> None:
    """Greedy outputs equal to their references, naming every prompt that diverged and
    where, so one failing run (often a GPU run of minutes) shows the whole pattern.
    ``want_lens``: tokens each output must have, where a reference may stop earlier (cut
    before a near-tie); by default an output must equal its reference whole."""
    bad = []
    for i, (n, ref, got) in enumerate(zip(prompt_lens, refs, outs)):
        want = len(ref) if want_lens is None else want_lens[i]
        ref = ref[:want]
        if len(got) != want or got[:len(ref)] != ref:
            bad.append((n, ref, got, want))
    summary = "; ".join(f"{n} tokens at token {first_difference(ref, got)}"
                        + (f" ({len(got)} of {want} tokens)" if len(got) != want else "")
                        for n, ref, got, want in bad)
    details = "".join(f"\n{n} tokens:\n  ref  {ref}\n  got  {got}" for n, ref, got, _ in bad)
    assert not bad, f"{label}: {len(bad)} of {len(refs)} prompts diverged: {summary}{details}"


def kill_stage_worker(stage_dir: Path, step: int, killed: dict, stop: threading.Event) -> None:
    """SIGKILL the stage's last worker, as its workers.json names it, once the stage has a
    checkpoint of ``step`` or later: a real crash for Ray to recover from. Polled often:
    the last steps of a tiny stage take ~0.1 s each, and a kill after its end proves
    nothing (the tests then fail). Run it in a thread; ``killed`` receives the worker."""
    from distillation import checkpoint as ckpt
    from distillation.trainer import WORKERS
    while not stop.wait(0.02):
        last = ckpt.latest_checkpoint(stage_dir / "checkpoints")
        if last is not None and int(last.name.removeprefix("step_")) >= step:
            killed.update(json.loads((stage_dir / WORKERS).read_text())["workers"][-1])
            os.kill(killed["pid"], signal.SIGKILL)
            return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir, log_path, *server_args: str, startup_timeout_s: float = 300):
    """``mamba-hybrid serve MODEL_DIR`` as a real subprocess on a free loopback port;
    yields its base URL once /health answers, and stops it afterwards."""
    import httpx
    import pytest
    port = free_port()
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_mamba_hybrid.cli", "serve", str(model_dir),
         "--host", "127.0.0.1", "--port", str(port), *server_args],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + startup_timeout_s
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-5000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not become healthy in {startup_timeout_s} s")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def run_under_triton_interpreter(code: str, marker: str, timeout: int = 600) -> None:
    """Run ``code`` in a fresh Python with ``TRITON_INTERPRET=1`` (it must be set before
    triton is imported, and slows every kernel down); fail unless it prints ``marker``."""
    import pytest
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0 and marker in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]

