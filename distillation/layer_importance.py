"""Which teacher layers matter most as attention: measured, to choose a student's layout.

``mamba-hybrid layer-importance TEACHER_DIR --out scores.json [--criterion loo|kl-guided]``.

A layer's score is the mean per-token KL(teacher || model) on a fixed sample of held-in
text when that one layer's attention is replaced by its attention-initialised Mamba mixer
(V->x, K->B, Q->C, O->out, ``init_hybrid_from_teacher``); higher = keep it as attention.

* ``loo`` (leave-one-out): the exact cost. Layer i's decoder block is swapped in place
  into the teacher (the zero-copy ``as_hybrid`` view) and the whole model runs again:
  L full forward passes for L layers.
* ``kl-guided``: one teacher forward records every layer's attention input x and output,
  and the residual stream r there and at the end (h). Layer i's change
  d = mamba(x) - attention(x) is carried to the output at the size it has relative to
  the stream where it is made: the score is KL(teacher || head(norm(h + d |h| / |r|))),
  per token. Normed layers see a perturbation's relative size, which the stream keeps
  as it grows, so early layers, whose stream is small, are not discounted (adding d
  unscaled ranked SmolLM2's layers almost by depth, Spearman -0.37 against ``loo``;
  scaled: +0.65, the same top two). Per layer one mixer and one head projection instead
  of a whole forward pass; blind to what later layers make of the change, which ``loo``
  measures.

The data: documents of the shared data, essays (those not held out for evaluation) and
training prompts (chat-formatted) in turn, each kind shuffled with the seed; the first
``SEQ_LEN`` tokens of each, concatenated until ``tokens`` tokens, cut into windows of
``SEQ_LEN``.
Scores are written after every layer to ``OUT.partial``: a rerun with the same settings
skips the layers already scored; other settings are refused.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from contextlib import contextmanager
from itertools import zip_longest
from pathlib import Path

import torch

from vllm_mamba_hybrid.config import check_attn_layers, paper_attention_layers

from . import fingerprint
from .config import DataConfig, EvalConfig
from .losses import greedy_agreement_count, kd_loss_sums
from .models import load_causal_lm, load_tokenizer
from .paths import resolve_data_dir
from .prompts import load_prompts
from .splits import heldout_essays
from .tokens import chat_prompt_ids

CRITERIA = {  # what each score is, in the words of reports and model cards
    "loo": "mean KL(teacher || the teacher with that one layer replaced by its "
           "attention-initialised Mamba mixer)",
    "kl-guided": "mean KL(teacher || the teacher's output moved by that layer's change "
                 "mamba(x) - attention(x), at its size relative to the residual stream there)",
}
DEFAULT_TOKENS = 512  # SmolLM2-135M on 2 busy CPU cores: loo 7 min, kl-guided 75 s
SEQ_LEN = 256
ROWS = 4  # windows per forward pass


# ---------------------------------------------------------------- data


def sample_tokens(tokenizer, data_dir: Path, tokens: int, seed: int) -> tuple[list[torch.Tensor], dict]:
    """(batches of token windows, description of the documents used); see the module doc."""
    train, _ = load_prompts(DataConfig(data_dir=str(data_dir)))
    heldout = set(heldout_essays(data_dir, EvalConfig.num_essays))
    essays = [p for p in sorted((data_dir / "essays").glob("*.txt")) if p not in heldout]
    rng = random.Random(seed)
    prompts = [("prompt", p["index"], p["instruction"]) for p in train]
    prose = [("essay", p.name, p) for p in essays]
    rng.shuffle(prompts)
    rng.shuffle(prose)
    # alternately an essay and a prompt: prose and chat both, however many of each there are
    docs = [d for pair in zip_longest(prose, prompts) for d in pair if d is not None]
    stream, used = [], {"prompts": [], "essays": []}
    for kind, name, source in docs:
        if len(stream) >= tokens:
            break
        if kind == "prompt":
            ids = chat_prompt_ids(tokenizer, source)
        else:
            ids = tokenizer(source.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        stream += ids[:SEQ_LEN]
        used[kind + "s"].append(name)
    if len(stream) < tokens:
        raise ValueError(f"{data_dir}: its held-in prompts and essays give {len(stream)} tokens, "
                         f"fewer than the {tokens} asked for")
    windows = [stream[i:i + SEQ_LEN] for i in range(0, tokens, SEQ_LEN)]
    windows[-1] = windows[-1][:tokens - SEQ_LEN * (len(windows) - 1)]
    batches: list[list[list[int]]] = []
    for w in windows:  # equal-length rows: no padding, no masks
        if batches and len(batches[-1]) < ROWS and len(batches[-1][0]) == len(w):
            batches[-1].append(w)
        else:
            batches.append([w])
    info = {"data_dir": str(data_dir), "seq_len": SEQ_LEN, "sequences": len(windows), **used}
    return [torch.tensor(b) for b in batches], info


# ---------------------------------------------------------------- scoring


def _mamba_layers(teacher, variant: str, d_state: int | None, seed: int):
    """Every layer as its attention-initialised Mamba block (one hybrid, built once)."""
    from vllm_mamba_hybrid.conversion.init import hybrid_config_from_teacher, init_hybrid_from_teacher
    cfg = hybrid_config_from_teacher(teacher.config, variant=variant, attn_layers=[], d_state=d_state)
    return init_hybrid_from_teacher(teacher, cfg, seed=seed).eval().model.layers


@contextmanager
def _swapped(view, i: int, block):
    """The teacher view with decoder block i replaced by ``block``, restored afterwards."""
    original = view.model.layers[i]
    view.model.layers[i] = block
    try:
        yield view
    finally:
        view.model.layers[i] = original


class _LeaveOneOut:
    def __init__(self, view, batches):
        self.view, self.batches = view, batches
        self.teacher_logits = [view(input_ids=x).logits for x in batches]

    def score(self, i: int, block) -> dict:
        kl = agree = n = 0
        with _swapped(self.view, i, block) as model:
            for x, t in zip(self.batches, self.teacher_logits):
                logits, every = model(input_ids=x).logits, torch.ones_like(x)
                k, _, m = kd_loss_sums(logits, t, x, every)
                a, _ = greedy_agreement_count(logits, t, x, every)
                kl, agree, n = kl + float(k), agree + a, n + m
        return {"kl": kl / n, "greedy_agreement": agree / n}


class _KLGuided:
    def __init__(self, view, batches):
        self.view, self.batches = view, batches
        n = len(view.model.layers)
        attn: dict[int, list] = {i: [] for i in range(n)}      # (input, output) per batch
        stream: dict[int, list] = {i: [] for i in range(n)}    # residual after the attention
        finals, hooks = [], []
        for i, layer in enumerate(view.model.layers):
            hooks.append(layer.self_attn.register_forward_hook(
                lambda mod, args, out, i=i: attn[i].append((args[0], out))))
            hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
                lambda mod, args, i=i: stream[i].append(args[0])))
        hooks.append(view.model.norm.register_forward_pre_hook(
            lambda mod, args: finals.append(args[0])))
        try:
            self.teacher_logits = [view(input_ids=x).logits for x in batches]
        finally:
            for h in hooks:
                h.remove()
        self.attn, self.stream, self.finals = attn, stream, finals

    def score(self, i: int, block) -> dict:
        kl = n = 0
        change = 0.0
        for x, t, (attn_in, attn_out), here, final in zip(
                self.batches, self.teacher_logits, self.attn[i], self.stream[i], self.finals):
            delta = block.mamba(attn_in) - attn_out
            relative = delta / here.norm(dim=-1, keepdim=True)   # per token
            moved = final + relative * final.norm(dim=-1, keepdim=True)
            logits = self.view.lm_head(self.view.model.norm(moved))
            k, _, m = kd_loss_sums(logits, t, x, torch.ones_like(x))
            kl, n = kl + float(k), n + m
            change += float(relative.norm(dim=-1).sum())
        return {"kl": kl / n, "relative_change": change / sum(x.numel() for x in self.batches)}


@torch.no_grad()
def score_layers(teacher, batches: list[torch.Tensor], *, criterion: str, variant: str,
                 d_state: int | None = None, seed: int = 0, done: dict | None = None,
                 on_layer=None) -> dict[int, dict]:
    """Per-layer details ({"kl": score, ...}) of a Llama ``teacher`` on token ``batches``;
    layers in ``done`` are kept as they are, ``on_layer(i, detail)`` follows each new one."""
    from tqdm import tqdm

    from vllm_mamba_hybrid.conversion.init import as_hybrid
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    details = dict(done or {})
    n = teacher.config.num_hidden_layers
    todo = [i for i in range(n) if i not in details]
    if not todo:
        return details
    device = next(teacher.parameters()).device
    batches = [x.to(device) for x in batches]
    blocks = _mamba_layers(teacher, variant, d_state, seed)
    view = as_hybrid(teacher.eval())
    scorer = (_LeaveOneOut if criterion == "loo" else _KLGuided)(view, batches)
    for i in tqdm(todo, desc=f"layer importance ({criterion})", unit="layer", initial=n - len(todo),
                  total=n, dynamic_ncols=True):
        details[i] = scorer.score(i, blocks[i])
        if on_layer is not None:
            on_layer(i, details[i])
    return details


def choose_attention_layers(scores: dict, *, fraction: float | None = None,
                            count: int | None = None) -> list[int]:
    """The ``count`` top-scoring layers (or as many as the paper's layout keeps for
    ``fraction``), ties broken by the lower index; sorted."""
    layers = sorted(int(k) for k in scores)
    n = len(layers)
    if layers != list(range(n)):
        raise ValueError(f"scores must cover layers 0..{n - 1} once each, got {layers}")
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction or count")
    if count is None:
        count = len(paper_attention_layers(n, fraction))
    if not 0 <= count <= n:
        raise ValueError(f"cannot keep {count} attention layers of {n}")
    value = {int(k): float(v) for k, v in scores.items()}
    ranked = sorted(range(n), key=lambda i: (-value[i], i))
    return check_attn_layers(ranked[:count], n)


# ---------------------------------------------------------------- files


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _check_settings(path: Path, settings: dict) -> dict | None:
    """The JSON at ``path`` if it holds scores for ``settings``; None if absent."""
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a layer scores file ({e}); delete it to start over, "
                         f"or write elsewhere") from None
    if old.get("settings") != settings:
        diff = {k: (old.get("settings", {}).get(k), v) for k, v in settings.items()
                if old.get("settings", {}).get(k) != v}
        raise ValueError(f"{path} holds layer scores computed with other settings "
                         f"(old, new: {diff}); delete it to start over, or write elsewhere")
    return old


def layer_importance(teacher_dir: str | os.PathLike, out: str | os.PathLike, *,
                     data_dir: str | os.PathLike | None = None, criterion: str = "loo",
                     variant: str = "mamba2", d_state: int | None = None,
                     tokens: int = DEFAULT_TOKENS, seed: int = 0, layers: list[int] | None = None,
                     device: str = "cpu", log=print) -> dict:
    """Score the layers of the teacher (or of its ``layers`` subset, a small student's
    stack) and write the result to ``out``; resumes from ``out``'s partial file."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if tokens < 2:
        raise ValueError(f"tokens must be >= 2, got {tokens}")
    teacher_dir, out = Path(teacher_dir), Path(out)
    data = resolve_data_dir(data_dir)
    settings = {"teacher": fingerprint.of_model_dir(teacher_dir), "layers": layers,
                "criterion": criterion, "variant": variant, "d_state": d_state,
                "tokens": tokens, "seq_len": SEQ_LEN, "seed": seed, "data_dir": str(data.resolve())}
    partial = out.with_name(out.name + ".partial")
    finished = _check_settings(out, settings)
    earlier = _check_settings(partial, settings)
    if finished is not None:
        log(f"layer importance: {out} has every layer scored already")
        return finished
    done = {int(k): v for k, v in (earlier or {}).get("details", {}).items()}
    if done:
        log(f"layer importance: resuming, {len(done)} layers already scored in {partial}")

    tokenizer = load_tokenizer(teacher_dir)
    batches, info = sample_tokens(tokenizer, data, tokens, seed)
    teacher = load_causal_lm(teacher_dir, torch.float32).to(device)
    if layers is not None:
        from vllm_mamba_hybrid.conversion.draft import layer_subset
        teacher = layer_subset(teacher, layers)
    result = {"teacher": str(teacher_dir), "criterion": criterion, "variant": variant,
              "d_state": d_state, "layers": layers, "tokens": tokens, "seed": seed, "data": info,
              "settings": settings}
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(i, detail):
        done[i] = detail
        _write_json(partial, {**result, "details": {str(k): done[k] for k in sorted(done)}})

    details = score_layers(teacher, batches, criterion=criterion, variant=variant, d_state=d_state,
                           seed=seed, done=done, on_layer=save)
    scores = {i: details[i]["kl"] for i in sorted(details)}
    result.update(scores={str(i): s for i, s in scores.items()},
                  ranking=sorted(scores, key=lambda i: (-scores[i], i)),
                  details={str(i): details[i] for i in sorted(details)})
    _write_json(out, result)
    partial.unlink(missing_ok=True)
    return result


def plot_scores(scores: dict, chosen: list[int], criterion: str, path: Path) -> Path | None:
    """Bar plot of the scores, the chosen attention layers highlighted; None without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [int(k) for k in scores]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(layers) + 2), 3.2))
    ax.bar(layers, list(scores.values()),
           color=["tab:orange" if i in chosen else "tab:blue" for i in layers])
    ax.set_xlabel("layer (orange: kept as attention)")
    ax.set_ylabel("KL(teacher || replaced)")
    ax.set_title(f"layer importance ({criterion})")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mamba-hybrid layer-importance",
                                description="Score each teacher layer by the KL its replacement "
                                            "by an attention-initialised Mamba mixer costs.")
    p.add_argument("teacher", help="teacher (Llama) model directory")
    p.add_argument("--out", required=True, help="the scores JSON")
    p.add_argument("--data", help="directory with alpaca_eval_prompts.jsonl and essays/ "
                                  "(default: the shared data)")
    p.add_argument("--criterion", default="loo", choices=CRITERIA)
    p.add_argument("--variant", default="mamba2", choices=("mamba2", "mamba1"))
    p.add_argument("--d-state", type=int, help="SSM state size (default: the variant's)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="held-in tokens scored on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    from vllm_mamba_hybrid.checkpoint import check_model_dir
    try:
        check_model_dir(args.teacher)
        result = layer_importance(args.teacher, args.out, data_dir=args.data,
                                  criterion=args.criterion, variant=args.variant,
                                  d_state=args.d_state, tokens=args.tokens, seed=args.seed,
                                  device=args.device, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        print(f"mamba-hybrid layer-importance: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mamba-hybrid layer-importance: interrupted; run the same command again to resume "
              f"(the layers scored so far are in {args.out}.partial)", file=sys.stderr)
        return 130
    print("layer  score (mean KL per token)")
    for i, s in result["scores"].items():
        print(f"{i:>5}  {s:.5f}")
    print(f"ranking (most important first): {result['ranking']}\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
