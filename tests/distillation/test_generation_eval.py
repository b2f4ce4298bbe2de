"""Generation-based evaluation (distillation/generation_eval.py, short_answers.py) on tiny
random models: the metrics against plain references (hand-made token lists, a by-hand
teacher forward, models built to answer one token forever), and `mamba-hybrid eval`."""
import json
import random
import shutil
from collections import Counter

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from distillation.config import ConfigError, DataConfig, EvalConfig, load_config
from distillation.evaluate import TeacherReference, eval_inputs, eval_main, evaluate_models
from distillation.generation_eval import never_stops, repeated_ngram_rate, repeated_ngrams
from distillation.short_answers import (extract_answer, is_correct, normalize_answer,
                                        short_answer_prompts)
from distillation.splits import heldout_essays
from tests.utils import make_random_hybrid, make_random_llama

EVAL = dict(num_prompts=4, max_new_tokens=10, num_essays=2, ppl_max_tokens=256, num_samples=1,
            num_short_answers=4, short_answer_max_new_tokens=6, ngram=3)


def _fresh_rng():
    seed = random.SystemRandom().randrange(2 ** 32)
    return random.Random(seed), f"seed {seed}"


def _reference_repeats(tokens, n):
    """Repeated n-grams counted another way: every occurrence after a gram's first."""
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return sum(c - 1 for c in grams.values())


@pytest.mark.parametrize("n", [1, 2, 4])
def test_repeated_ngrams_find_exactly_a_planted_repeat(n):
    """Distinct random tokens repeat nothing; a copied segment of m tokens appended to
    them repeats exactly m - n + 1 n-grams (none when m < n)."""
    rng, seed = _fresh_rng()
    tokens = rng.sample(range(10 ** 6), rng.randrange(n, 60))
    assert repeated_ngrams(tokens, n) == (0, len(tokens) - n + 1), seed
    start = rng.randrange(len(tokens))
    m = rng.randrange(1, len(tokens) - start + 1)
    planted = tokens + tokens[start:start + m]
    assert repeated_ngrams(planted, n) == (max(m - n + 1, 0), len(planted) - n + 1), seed


def test_repeated_ngram_rate_pools_answers_and_leaves_out_eos():
    rng, seed = _fresh_rng()
    eos, n = 0, 3
    answers = [[rng.randrange(1, 6) for _ in range(rng.randrange(0, 30))] for _ in range(7)]
    answers = [a + [eos] if rng.random() < 0.5 else a for a in answers]
    bodies = [[t for t in a if t != eos] for a in answers]
    repeats = sum(_reference_repeats(b, n) for b in bodies)
    total = sum(max(len(b) - n + 1, 0) for b in bodies)
    assert repeated_ngram_rate(answers, n, eos) == pytest.approx(repeats / total), seed
    assert repeated_ngram_rate([[5, eos], [eos]], n, eos) == 0.0   # no answer has n tokens


def test_never_stops_is_an_answer_without_eos():
    eos = 7
    assert never_stops([3, 4, 5], eos) and never_stops([], eos)
    assert not never_stops([3, eos], eos) and not never_stops([eos], eos)


def test_short_answer_prompts_are_deterministic_and_checkable(shared_dir):
    essays = heldout_essays(shared_dir / "data", 2)
    prompts = short_answer_prompts(essays, 7)
    assert prompts == short_answer_prompts(essays, 7)
    assert [p["kind"] for p in prompts] == ["cloze", "arithmetic"] * 3 + ["cloze"]
    text = " ".join(" ".join(e.read_text().split()) for e in essays)
    for p in prompts:
        if p["kind"] == "cloze":   # the blanked sentence, completed by its reference, is the essay's
            body = p["instruction"].split("\n\n", 1)[1]
            assert body.replace("____", p["reference"]) in text, p
        else:                      # the reference is the arithmetic's result
            a, op, b = p["instruction"].removeprefix("What is ").split("?")[0].split()
            assert int(p["reference"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    with pytest.raises(ValueError, match="100000 short-answer prompts need 50000 clean sentences"):
        short_answer_prompts(essays, 100000)


def test_normalize_answer():
    assert normalize_answer("\n  Paris.\nIt is in France.") == normalize_answer("paris") == "paris"
    assert normalize_answer("The result is -21!") == "the result is -21"
    assert normalize_answer("well-known,  really") == "well known really"


def test_extract_answer_from_the_replies_small_models_give():
    cloze = {"kind": "cloze", "context": "But the pool of writers is very, very", "reference": "large"}
    plus = {"kind": "arithmetic", "reference": "-32"}
    assert extract_answer(cloze, "But the pool of writers is very, very talented.") == "talented"
    assert extract_answer(cloze, "Large.\nBecause ...") == "large" and is_correct(cloze, "large!")
    assert extract_answer(cloze, "The word is large") == "the word is large"   # no clean answer
    assert extract_answer(plus, "43 - 75 = -32.") == "-32" and is_correct(plus, "It is -32")
    assert extract_answer(plus, "43 - 75 is 22.") == "22" and not is_correct(plus, "-3")
    assert extract_answer(plus, "I cannot say") == "i cannot say"


def constant_answer_model(src, dst, token: int, C: float = 10.0) -> None:
    """A copy of the Llama ``src`` whose greedy next token is always ``token``: hidden
    dimension 0 holds C in every embedding and nothing writes to it; the final norm keeps
    only that dimension, and only ``token``'s head row reads it."""
    shutil.copytree(src, dst)
    w = load_file(dst / "model.safetensors")
    w["model.embed_tokens.weight"][:, 0] = C
    for name in w:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name][0] = 0.0
    w["model.norm.weight"].zero_()
    w["model.norm.weight"][0] = 1.0
    w["lm_head.weight"][:, 0] = 0.0
    w["lm_head.weight"][token, 0] = 1.0
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval")
    make_random_llama(root / "teacher", num_layers=2, scale=2.0)
    shutil.copytree(root / "teacher", root / "copy")
    make_random_hybrid(root / "student", "mamba2", num_layers=2, attn_layers=(1,), scale=2.0)
    eos = json.loads((root / "teacher" / "config.json").read_text())["eos_token_id"]
    constant_answer_model(root / "teacher", root / "stops", eos)
    constant_answer_model(root / "teacher", root / "loops", 100)
    return root


@pytest.fixture(scope="module")
def result(models, shared_dir):
    names = ("copy", "stops", "loops")
    return evaluate_models({n: models / n for n in names}, models / "teacher",
                           data=DataConfig(data_dir=str(shared_dir / "data")),
                           cfg=EvalConfig(**EVAL), log=lambda m: None)


def test_teacher_and_its_copy_score_exactly_the_ceiling(result):
    ceiling, teacher, copy = (result["judge_ceiling"], result["teacher_generation"],
                              result["models"]["copy"])
    assert ceiling < 0
    for m in (teacher, copy):
        assert m["judge_logp"] == ceiling and m["judge_gap"] == 0.0 and m["judge_ratio"] == 1.0
        assert m["short_answer_agreement"] == 1.0
    for key in ("repeated_ngram_rate", "never_stops", "short_answer_correct", "short_answers"):
        assert copy[key] == teacher[key], key
    assert [p["teacher"] for p in result["short_answer_prompts"]] == teacher["short_answers"]


def test_stopping_and_looping_models(result):
    """One answers EOS at once: nothing never stops or repeats. The other says token 100
    for ever: every answer runs to the cap, L tokens repeating all n-grams but the first."""
    stops, loops = result["models"]["stops"], result["models"]["loops"]
    assert stops["never_stops"] == 0.0 and stops["mean_answer_tokens"] == 1.0
    assert stops["repeated_ngram_rate"] == 0.0
    L, n = EVAL["max_new_tokens"], EVAL["ngram"]
    assert loops["never_stops"] == 1.0 and loops["mean_answer_tokens"] == L
    assert loops["repeated_ngram_rate"] == pytest.approx((L - n) / (L - n + 1))
    teacher_short = [extract_answer(p, p["teacher"]) for p in result["short_answer_prompts"]]
    assert stops["short_answer_agreement"] == sum(t == "" for t in teacher_short) / len(teacher_short)


def test_judge_equals_a_teacher_forward_by_hand(models, shared_dir):
    """The student's answers scored one at a time, unpadded, in float64 log-softmax."""
    from distillation.models import load_causal_lm
    cfg = EvalConfig(**EVAL)
    heldout, _, short = eval_inputs(DataConfig(data_dir=str(shared_dir / "data")), cfg)
    ref = TeacherReference(models / "teacher", heldout, cfg, "cpu", short)
    student = load_causal_lm(models / "student", torch.float32).eval()
    metrics, answers = ref.generation.evaluate(student)
    means = []
    for prompt, answer in zip(ref.prompt_ids, answers):
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = torch.log_softmax(ref.teacher(input_ids=ids).logits[0].double(), -1)
        means.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))
                     / len(answer))
    assert metrics["judge_logp"] == pytest.approx(sum(means) / len(means), rel=1e-5)
    assert metrics["judge_gap"] == pytest.approx(ref.generation.ceiling - metrics["judge_logp"])
    assert metrics["judge_logp"] != ref.generation.ceiling   # it answers otherwise


def test_eval_cli_prints_and_writes_the_generation_metrics(models, shared_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = [str(models / "student"), "--teacher", str(models / "teacher"),
            "--data-dir", str(shared_dir / "data"), "--out", str(out),
            *[a for k, v in EVAL.items() for a in ("--" + k.replace("_", "-"), str(v))]]
    assert eval_main(argv) == 0
    header, teacher_row, model_row = capsys.readouterr().out.splitlines()[:3]
    for column in ("judge logp", "gap", "short agree", "rep 3-gram", "no stop", "perplexity"):
        assert column in header
    assert teacher_row.split()[0] == "teacher" and model_row.split()[0] == "model"
    assert len(teacher_row.split()) == len(model_row.split()) == 9
    result = json.loads(out.read_text())
    for m in (result["models"]["model"], result["teacher_generation"]):
        for key in ("judge_logp", "judge_gap", "judge_ratio", "short_answer_agreement",
                    "short_answer_correct", "repeated_ngram_rate", "never_stops"):
            assert isinstance(m[key], float), key
    assert len(result["short_answer_prompts"]) == EVAL["num_short_answers"]


@pytest.mark.parametrize("flag, value, named", [
    ("--num-prompts", "1000", "--num-prompts 1000"), ("--ngram", "0", "--ngram must be >= 1"),
    ("--num-essays", "0", "--num-essays must be >= 1"),
    ("--num-short-answers", "100000", "--num-short-answers"),
])
def test_eval_cli_refuses_what_it_cannot_honour_naming_the_flag(models, shared_dir, capsys,
                                                                 flag, value, named):
    argv = [str(models / "student"), "--teacher", str(models / "teacher"),
            "--data-dir", str(shared_dir / "data"), flag, value]
    assert eval_main(argv) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("key, value, named", [
    ("eval.num_prompts", 1000, "`eval.num_prompts` 1000"),
    ("eval.num_samples", -1, "`eval.num_samples` must be >= 0"),
    ("eval.short_answer_max_new_tokens", 0, "`eval.short_answer_max_new_tokens` must be >= 1"),
    ("eval.num_short_answers", 100000, "`eval.num_short_answers` 100000"),
])
def test_pipeline_refuses_eval_settings_before_writing(models, shared_dir, tmp_path, key, value,
                                                       named):
    """Checked in the config (types, ranges) or in preflight (what the data holds), before
    the output directory exists."""
    from distillation.pipeline import preflight
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "teacher": {"path": str(models / "teacher")},
        "data": {"data_dir": str(shared_dir / "data")}, "backend": {"kind": "local",
                                                                    "num_workers": 1}}))
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        preflight(load_config(cfg_path, {key: value}), log=lambda m: None)
    assert not (tmp_path / "run").exists()
