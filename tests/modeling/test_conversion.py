"""Teacher import (real SmolLM2), init, paper-format conversion, CLI errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaForCausalLM)

from tests.utils import make_random_hybrid, make_random_llama, write_paper_checkpoint
from vllm_mamba_hybrid import LlamaMambaHybridForCausalLM
from vllm_mamba_hybrid.cli import main as cli
from vllm_mamba_hybrid.conversion.paper import convert_paper


def test_imported_smollm2_answers_a_chat_prompt(smollm2_teacher):
    files = {p.name for p in smollm2_teacher.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    config = json.loads((smollm2_teacher / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert config["torch_dtype" if "torch_dtype" in config else "dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(smollm2_teacher)
    model = LlamaForCausalLM.from_pretrained(smollm2_teacher, dtype=torch.float32)
    assert tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.parametrize("variant", ["mamba2"])
def test_init_on_smollm2_loads_through_auto(smollm2_teacher, tmp_path, variant):
    out = tmp_path / "hybrid"
    assert cli(["init", "--teacher", str(smollm2_teacher), "--variant", variant,
                "--attn-fraction", "0.5", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(model, LlamaMambaHybridForCausalLM)
    assert model.config.attn_layers == list(range(1, 30, 2))
    assert model.config.d_state == 64 and model.config.d_xb == 192
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    teacher = LlamaForCausalLM.from_pretrained(smollm2_teacher, dtype=torch.float32)
    # the kept attention layers and MLPs are the teacher's, by value
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(model.model.layers[0].mamba.out_proj.weight, teacher.model.layers[0].self_attn.o_proj.weight)


# ---- paper format ------------------------------------------------------------------

@pytest.mark.parametrize("variant,fmt", [("mamba1", "bin"), ("mamba2", "safetensors"), ("mamba2", "bin")])
def test_convert_paper_preserves_numerics(tmp_path, variant, fmt):
    src_model = make_random_hybrid(tmp_path / "orig", variant, seed=3).eval()
    paper = write_paper_checkpoint(src_model, tmp_path / "paper", fmt=fmt)
    dst = convert_paper(paper, tmp_path / "converted")
    converted = AutoModelForCausalLM.from_pretrained(dst).eval()
    cfg = converted.config
    assert cfg.mamba_variant == variant and cfg.attn_layers == [1, 3]
    assert cfg.d_state == (16 if variant == "mamba1" else cfg.head_dim)
    ids = torch.randint(0, 512, (2, 23))
    assert torch.equal(converted(ids).logits, src_model(ids).logits)


def test_convert_paper_names_missing_and_misshapen_tensors(tmp_path):
    model = make_random_hybrid(tmp_path / "orig", "mamba2")
    paper = write_paper_checkpoint(model, tmp_path / "paper", fmt="safetensors")
    tensors = load_file(paper / "model.safetensors")
    dropped = tensors.pop("model.layers.2.mamba.dt_bias")
    save_file(tensors, paper / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.2.mamba.dt_bias'\]"):
        convert_paper(paper, tmp_path / "out1")
    tensors["model.layers.2.mamba.dt_bias"] = torch.cat([dropped, dropped])
    save_file(tensors, paper / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.2.mamba.dt_bias has shape \(8,\)"):
        convert_paper(paper, tmp_path / "out2")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_convert_paper_rejects_unsupported_ssm_cfg(tmp_path):
    model = make_random_hybrid(tmp_path / "orig", "mamba2")
    paper = write_paper_checkpoint(model, tmp_path / "paper")
    cfg = json.loads((paper / "mamba_config.json").read_text())
    cfg["ssm_cfg"]["D_has_hdim"] = True
    (paper / "mamba_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="D_has_hdim"):
        convert_paper(paper, tmp_path / "out")


# ---- CLI errors ------------------------------------------------------------------

@pytest.fixture()
def tiny_teacher(tmp_path):
    make_random_llama(tmp_path / "teacher")
    return tmp_path / "teacher"


def test_cli_init_tiny_teacher_and_generate(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "h"
    assert cli(["init", "--teacher", str(tiny_teacher), "--variant", "mamba1",
                "--attn-layers", "0,2", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["attn_layers"] == [0, 2]
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()
    args = ["generate", str(out), "--prompt", "hello there", "--prompt", "a longer prompt, padded left",
            "--max-new-tokens", "6"]
    assert cli(args) == 0
    plain = capsys.readouterr().out
    assert "### hello there" in plain
    assert cli(args + ["--fast"]) == 0
    assert capsys.readouterr().out == plain
    # speculative, with a draft cut from the teacher, then with its head cut to a third
    from vllm_mamba_hybrid.spec_decode.draft_vocab import save_draft_vocab
    draft = tmp_path / "draft"
    assert cli(["draft", str(tiny_teacher), str(draft), "--layers", "0"]) == 0
    capsys.readouterr()
    for cut in (False, True):
        if cut:
            vocab = json.loads((draft / "config.json").read_text())["vocab_size"]
            save_draft_vocab(draft, torch.randperm(vocab)[:vocab // 3].tolist(), vocab, [], 0)
        assert cli(args + ["--draft", str(draft)]) == 0
        assert capsys.readouterr().out == plain, cut


def test_cli_init_d_state(tiny_teacher, tmp_path, capsys):
    """The teacher has 2 KV heads of 16 dims: --d-state must divide their 32 rows."""
    assert cli(["init", "--teacher", str(tiny_teacher), "--variant", "mamba1", "--attn-layers", "1",
                "--d-state", "32", str(tmp_path / "h")]) == 0
    assert json.loads((tmp_path / "h" / "config.json").read_text())["d_state"] == 32
    assert cli(["init", "--teacher", str(tiny_teacher), "--variant", "mamba1", "--attn-layers", "1",
                "--d-state", "24", str(tmp_path / "o")]) == 2
    assert "must be multiples of d_state (24)" in capsys.readouterr().err
    assert cli(["init", "--teacher", str(tiny_teacher), "--variant", "mamba1", "--attn-layers", "1",
                "--d-state", "0", str(tmp_path / "o")]) == 2
    assert "d_state must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_unknown_variant(tiny_teacher, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["init", "--teacher", str(tiny_teacher), "--variant", "mamba3", "--attn-fraction", "0.5",
             str(tmp_path / "o")])
    assert e.value.code == 2 and "invalid choice: 'mamba3'" in capsys.readouterr().err


def test_cli_attention_layer_out_of_range(tiny_teacher, tmp_path, capsys):
    assert cli(["init", "--teacher", str(tiny_teacher), "--variant", "mamba2", "--attn-layers", "1,9",
                str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "attn_layers [9] out of range" in err and "4 layers" in err
    assert not (tmp_path / "o").exists()


def test_cli_rejects_non_llama_teacher(tmp_path, capsys):
    bad = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(bad)
    assert cli(["init", "--teacher", str(bad), "--variant", "mamba2", "--attn-fraction", "0.5",
                str(tmp_path / "o")]) == 2
    assert "model_type is 'gpt2'" in capsys.readouterr().err
    assert cli(["import-teacher", str(bad), str(tmp_path / "t")]) == 2


def test_cli_refuses_existing_output_unless_overwrite(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["init", "--teacher", str(tiny_teacher), "--variant", "mamba2", "--attn-fraction", "0.5"]
    assert cli(args + [str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert cli(args + ["--overwrite", str(out)]) == 0
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_import_teacher_from_hf_directory(tiny_teacher, tmp_path):
    assert cli(["import-teacher", str(tiny_teacher), str(tmp_path / "imported")]) == 0
    a = LlamaForCausalLM.from_pretrained(tiny_teacher)
    b = LlamaForCausalLM.from_pretrained(tmp_path / "imported")
    assert b.dtype == torch.bfloat16
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight.bfloat16(), b.model.layers[0].mlp.up_proj.weight)


def test_cli_draft_keeps_the_named_teacher_layers(tiny_teacher, tmp_path):
    out = tmp_path / "draft"
    assert cli(["draft", str(tiny_teacher), str(out), "--layers", "0,3"]) == 0
    teacher = LlamaForCausalLM.from_pretrained(tiny_teacher)
    draft = LlamaForCausalLM.from_pretrained(out)
    assert draft.config.num_hidden_layers == 2 and (out / "tokenizer.json").is_file()
    assert torch.equal(draft.model.layers[1].mlp.up_proj.weight,
                       teacher.model.layers[3].mlp.up_proj.weight.to(draft.dtype))
    assert cli(["draft", str(tiny_teacher), str(tmp_path / "bad"), "--layers", "0,9"]) == 2
