"""A draft's head cut to frequent tokens (``draft_vocab``): the ranking against a plain
count, the file's checks, the cut head against the full one, and the CLI on the real
SmolLM2 tokenizer."""
import collections
import json
import random

import pytest
import torch

from vllm_mamba_hybrid.cli import main as cli_main
from vllm_mamba_hybrid.spec_decode.draft_vocab import (
    DRAFT_VOCAB_FILE,
    cut_head,
    iter_texts,
    load_draft_vocab,
    rank_tokens,
    save_draft_vocab,
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_teacher):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_teacher)


def _random_texts(rng, n=40):
    words = ["alpha", "beta", "gamma", "delta", " the", "of", "Mamba", "state", "42", "\n"]
    weights = [rng.random() ** 3 for _ in words]
    return ["".join(rng.choices(words, weights, k=rng.randint(5, 60))) for _ in range(n)]


def test_rank_tokens_keeps_the_most_frequent_after_the_special_ones(tokenizer):
    rng = random.Random()
    texts = _random_texts(rng)
    counts = collections.Counter(t for text in texts
                                 for t in tokenizer(text, add_special_tokens=False)["input_ids"])
    always = [tokenizer.eos_token_id, 0]
    size = min(len(counts), 12)
    ids, counted = rank_tokens(tokenizer, texts, size, always=always)
    assert counted == sum(counts.values()) and len(ids) == size == len(set(ids))
    assert ids == sorted(ids) and set(always) <= set(ids)
    kept_counts = sorted((counts[i] for i in ids if i not in always), reverse=True)
    dropped = [c for t, c in counts.items() if t not in ids]
    assert not dropped or min(kept_counts) >= max(dropped)   # nothing rarer kept over it
    # more room than distinct tokens: every counted token, then the lowest other ids
    ids, _ = rank_tokens(tokenizer, texts, len(counts) + 5, always=always)
    assert set(counts) <= set(ids) and len(ids) == len(counts) + 5
    with pytest.raises(ValueError, match="size must be in"):
        rank_tokens(tokenizer, texts, 0)


def test_iter_texts_reads_files_jsonl_fields_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("plain prose")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": 1, "instruction": "q?", "answer": "a."})
                                      + "\n\n" + json.dumps({"answer": "b."}) + "\n")
    assert list(iter_texts([tmp_path / "b.jsonl"], "answer")) == ["a.", "b."]
    assert list(iter_texts([tmp_path / "b.jsonl"])) == ["q?", "a.", "b."]
    assert list(iter_texts([tmp_path], "answer")) == ["plain prose", "a.", "b."]
    with pytest.raises(ValueError, match=r"b\.jsonl, line 3: no string field 'instruction'"):
        list(iter_texts([tmp_path / "b.jsonl"], "instruction"))
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"c\.jsonl, line 1: not JSON"):
        list(iter_texts([tmp_path / "c.jsonl"]))
    (tmp_path / "c.jsonl").write_text('["a list"]\n')
    with pytest.raises(ValueError, match=r"c\.jsonl, line 1: not a JSON object"):
        list(iter_texts([tmp_path / "c.jsonl"]))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(iter_texts([tmp_path / "missing.txt"]))
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(ValueError, match=r"d\.csv: expected"):
        list(iter_texts([tmp_path / "d.csv"]))


def test_load_draft_vocab_checks_the_file(tmp_path):
    assert load_draft_vocab(tmp_path, 100) is None          # no file: the full head
    save_draft_vocab(tmp_path, [7, 3, 50], 100, ["x.txt"], 9)
    assert load_draft_vocab(tmp_path, 100).tolist() == [3, 7, 50]
    with pytest.raises(ValueError, match="made for a vocabulary of 100 tokens, the draft's head has 64"):
        load_draft_vocab(tmp_path, 64)
    for bad in ([3, 3], [100], [], [1.5]):
        save_draft_vocab(tmp_path, bad, 100, [], 0)
        with pytest.raises(ValueError, match=f"{DRAFT_VOCAB_FILE}: token_ids must be distinct"):
            load_draft_vocab(tmp_path, 100)
    (tmp_path / DRAFT_VOCAB_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected JSON with a 'token_ids' list"):
        load_draft_vocab(tmp_path, 100)


@pytest.mark.parametrize("bias", [False, True])
def test_cut_head_is_the_full_heads_rows_and_keeps_a_kept_argmax(bias):
    vocab, hidden = 300, 32
    head = torch.nn.Linear(hidden, vocab, bias=bias)
    ids = torch.randperm(vocab)[:120].sort().values
    cut = cut_head(head, ids)
    x = torch.randn(64, hidden)
    full = head(x)
    torch.testing.assert_close(cut(x), full[:, ids])
    picked = ids[cut(x).argmax(-1)]
    kept = torch.isin(full.argmax(-1), ids)
    assert kept.any() and torch.equal(picked[kept], full.argmax(-1)[kept])


def test_draft_vocab_cli_on_the_smollm2_tokenizer(smollm2_teacher, shared_dir, tmp_path, capsys):
    import shutil
    draft = tmp_path / "draft"
    shutil.copytree(smollm2_teacher, draft)
    args = ["draft-vocab", str(draft), "--size", "512", "--texts",
            str(shared_dir / "data" / "alpaca_eval_prompts.jsonl"), "--field", "instruction"]
    assert cli_main(args) == 0
    ids = load_draft_vocab(draft, 49152)
    assert len(ids) == 512 and 2 in ids.tolist()            # EOS (<|im_end|>) kept
    assert cli_main(["draft-vocab", str(tmp_path), "--size", "8", "--texts", str(draft)]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert cli_main(args[:2] + ["--size", "60000"] + args[4:]) == 2
    assert "--size must be in [1, 49152]" in capsys.readouterr().err
