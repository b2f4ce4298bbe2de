"""`mamba-hybrid serve` as a real server process: OpenAI completions and chat,
streaming, concurrency, and malformed requests, all against one server."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.utils import make_random_hybrid, running_server

pytestmark = pytest.mark.vllm
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("served_hybrid")
    make_random_hybrid(ckpt, "mamba2", hidden_size=128, heads=4, kv_heads=2,
                       intermediate_size=256, scale=3.0, seed=7, tokenizer=True)
    with running_server(ckpt, tmp_path_factory.mktemp("server_log") / "server.log",
                        "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.2",
                        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "16",
                        "--served-model-name", "hybrid", startup_timeout_s=STARTUP_TIMEOUT_S) as base:
        yield base


def _complete(base, prompt, max_tokens=16, **extra):
    r = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "model": "hybrid", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        **extra})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def _stream_text(base, path, body) -> str:
    pieces = []
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True}, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data: "):])["choices"][0]
            pieces.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(pieces)


def test_completion_streaming_equals_non_streaming(server):
    body = {"model": "hybrid", "prompt": "The history of the river", "max_tokens": 24,
            "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=120)
    r.raise_for_status()
    out = r.json()
    assert out["usage"]["completion_tokens"] == 24
    text = out["choices"][0]["text"]
    assert text
    assert _stream_text(server, "/v1/completions", body) == text


def test_chat_streaming_equals_non_streaming(server):
    body = {"model": "hybrid", "messages": [{"role": "user", "content": "Tell me about rivers."}],
            "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    out = r.json()
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["completion_tokens"] == 24
    text = out["choices"][0]["message"]["content"]
    assert text
    assert _stream_text(server, "/v1/chat/completions", body) == text


def test_concurrent_requests_equal_sequential(server):
    prompts = [f"Essay {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i)
               for i in range(16)]
    sequential = [_complete(server, p, ignore_eos=True) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda p: _complete(server, p, ignore_eos=True), prompts))
    assert concurrent == sequential


@pytest.mark.parametrize("content,needle", [
    ('{"model": "hybrid", "prompt": "hi", ', "json"),
    (json.dumps({"model": "hybrid", "prompt": "hi", "max_tokens": -5}), "max_tokens"),
    (json.dumps({"model": "hybrid", "prompt": "word " * (2 * MAX_MODEL_LEN), "max_tokens": 4}),
     "context length"),
])
def test_malformed_request_gets_4xx_and_server_keeps_serving(server, content, needle):
    r = httpx.post(f"{server}/v1/completions", content=content, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert needle in r.text.lower()
    assert _complete(server, "Still there?", max_tokens=4)


def test_served_teacher_answers_the_capital_of_france(smollm2_teacher, tmp_path):
    """The real SmolLM2 teacher (a bf16 checkpoint) through the OpenAI chat API, greedy,
    with the server's default dtype: float32 on the CPU engine, where bf16 answers this
    wrongly (README, Install); on CUDA bf16 is asked for explicitly."""
    import torch
    dtype = ["--dtype", "bfloat16"] if torch.cuda.is_available() else []
    log = tmp_path / "teacher.log"
    with running_server(smollm2_teacher, log, *dtype, "--enforce-eager",
                        "--gpu-memory-utilization", "0.2", "--max-model-len", "1024",
                        "--served-model-name", "teacher",
                        startup_timeout_s=STARTUP_TIMEOUT_S) as base:
        r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "teacher", "temperature": 0, "max_tokens": 32,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        r.raise_for_status()
        answer = r.json()["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer


def test_default_dtype_keeps_48_concurrent_chats_equal_to_sequential(tmp_path, shared_dir):
    """A float32 export served with no --dtype: on the CPU engine the project's default is
    float32 (vLLM's "auto" would downcast it to bf16, where exact logit ties make answers
    depend on which requests share a batch), so 48 concurrent greedy chats equal the same
    chats sent one by one. On CUDA the default stays vLLM's (bf16), where batch invariance
    is not promised."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("the float32 default is the CPU engine's")
    ckpt = tmp_path / "export"
    make_random_hybrid(ckpt, "mamba2", hidden_size=128, heads=4, kv_heads=2,
                       intermediate_size=256, scale=3.0, seed=11, tokenizer=True)
    lines = (shared_dir / "data" / "alpaca_eval_prompts.jsonl").read_text().splitlines()[:48]
    questions = [json.loads(line)["instruction"] for line in lines]
    log = tmp_path / "server.log"
    with running_server(ckpt, log, "--enforce-eager", "--gpu-memory-utilization", "0.2",
                        "--max-model-len", "1024", "--max-num-seqs", "48",
                        "--served-model-name", "hybrid", startup_timeout_s=STARTUP_TIMEOUT_S) as base:
        def chat(question):
            r = httpx.post(f"{base}/v1/chat/completions", timeout=300, json={
                "model": "hybrid", "temperature": 0, "max_tokens": 24,
                "messages": [{"role": "user", "content": question}]})
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]

        sequential = [chat(q) for q in questions]
        with ThreadPoolExecutor(len(questions)) as pool:
            concurrent = list(pool.map(chat, questions))
    assert "Downcasting" not in log.read_text()
    differ = [i for i, (a, b) in enumerate(zip(sequential, concurrent)) if a != b]
    assert not differ, f"{len(differ)} of 48 answers changed under concurrency: {differ}"
