"""Reference hybrid model: incremental decoding, generate(), teacher equivalence, layouts."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tests.utils import tiny_llama_config
from vllm_mamba_hybrid import LlamaMambaHybridConfig, LlamaMambaHybridForCausalLM
from vllm_mamba_hybrid.conversion.init import hybrid_config_from_teacher, init_hybrid_from_teacher
from vllm_mamba_hybrid.modeling import HybridCache

VARIANTS = ["mamba1", "mamba2"]


def tiny_hybrid(variant, attn_layers=(1, 3), num_layers=4, **kw):
    base = tiny_llama_config(num_layers=num_layers, **kw).to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        base.pop(k)
    cfg = LlamaMambaHybridConfig(**base, attn_layers=list(attn_layers), mamba_variant=variant,
                                 ssm_chunk_size=8)
    return LlamaMambaHybridForCausalLM(cfg).eval()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_then_steps_equals_full_forward(variant):
    model = tiny_hybrid(variant)
    length = random.randint(20, 40)
    ids = torch.randint(0, 512, (3, length))
    full = model(ids).logits
    split = random.randint(1, length - 5)
    cache = HybridCache(model.config)
    pieces = [model(ids[:, :split], past_key_values=cache, use_cache=True).logits]
    # a multi-token continuation chunk (chunked prefill), then single steps
    pieces.append(model(ids[:, split:split + 3], past_key_values=cache, use_cache=True).logits)
    for t in range(split + 3, length):
        pieces.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert rel(torch.cat(pieces, 1), full) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_equals_recomputing_each_step(variant):
    model = tiny_hybrid(variant)
    ids = torch.randint(3, 512, (2, 11))
    out = model.generate(ids, max_new_tokens=12, eos_token_id=[])
    seq = ids
    for _ in range(12):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_equals_single_prompts(variant):
    model = tiny_hybrid(variant)
    lengths = [5, 17, 9]
    prompts = [torch.randint(3, 512, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=8, eos_token_id=[])
        assert torch.equal(batch[i, width:], single[0, len(p):])


def test_generate_stops_at_eos_and_pads():
    model = tiny_hybrid("mamba2")
    ids = torch.randint(3, 512, (2, 6))
    free = model.generate(ids, max_new_tokens=10, eos_token_id=[])
    eos = int(free[0, 8])  # row 0's 3rd new token becomes "EOS"
    out = model.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    stop = (free[0, 6:] == eos).nonzero()[0].item()
    assert torch.equal(out[0, 6:6 + stop + 1], free[0, 6:6 + stop + 1])
    assert (out[0, 6 + stop + 1:] == 0).all()


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}])
def test_all_attention_hybrid_equals_teacher(rope):
    kw = {} if rope is None else {"rope_parameters": rope}
    teacher = LlamaForCausalLM(tiny_llama_config(num_layers=3, **kw)).eval()
    cfg = hybrid_config_from_teacher(teacher.config, variant="mamba2", attn_layers=[0, 1, 2])
    hybrid = init_hybrid_from_teacher(teacher, cfg).eval()
    ids = torch.randint(0, 512, (2, 150))  # past original_max_position_embeddings
    assert torch.allclose(hybrid(ids).logits, teacher(ids).logits, atol=1e-5, rtol=1e-5)
    mask = torch.ones_like(ids)
    mask[0, :20] = 0
    assert torch.allclose(hybrid(ids, attention_mask=mask).logits[1],
                          teacher(ids, attention_mask=mask).logits[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_to_mamba_mapping_by_value(variant):
    teacher = LlamaForCausalLM(tiny_llama_config(num_layers=4)).eval()
    cfg = hybrid_config_from_teacher(teacher.config, variant=variant, attn_fraction=0.5)
    assert cfg.attn_layers == [1, 3]
    hybrid = init_hybrid_from_teacher(teacher, cfg)
    d_in, d_xb = cfg.d_inner, cfg.d_xb
    for i in cfg.mamba_layers:
        attn, mixer = teacher.model.layers[i].self_attn, hybrid.model.layers[i].mamba
        if variant == "mamba2":
            w = mixer.in_proj.weight
            x, B, C = w[d_in:d_in + d_xb], w[d_in + d_xb:d_in + 2 * d_xb], w[d_in + 2 * d_xb:2 * d_in + 2 * d_xb]
        else:
            x, B, C = mixer.in_proj_x.weight, mixer.B_proj.weight, mixer.C_proj.weight
        assert torch.equal(x, attn.v_proj.weight) and torch.equal(B, attn.k_proj.weight)
        assert torch.equal(C, attn.q_proj.weight) and torch.equal(mixer.out_proj.weight, attn.o_proj.weight)
        for name in ("mlp.gate_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                     "post_attention_layernorm.weight"):
            assert torch.equal(hybrid.get_parameter(f"model.layers.{i}.{name}"),
                               teacher.get_parameter(f"model.layers.{i}.{name}"))
    for i in cfg.attn_layers:
        assert torch.equal(hybrid.model.layers[i].self_attn.q_proj.weight,
                           teacher.model.layers[i].self_attn.q_proj.weight)
    assert torch.equal(hybrid.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(hybrid.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


@pytest.mark.parametrize("d_state", [16, 32])
def test_mamba1_attention_init_pairs_dimensions_like_attention(d_state):
    """Mamba1 repeats x (V) and B (K) in d_state-channel groups; with d_state < head_dim
    each channel's C row (Q) must meet the same head dimension of the matching KV head
    in B, and its V dimension must reach the O column of that dimension in its query
    head (at d_state = head_dim each group is one whole head). Rows and columns are
    tagged with their index and followed through the mixer's own repeat. The layer also
    starts mixing: PyTorch's conv scale, dt in Mamba's range."""
    teacher = LlamaForCausalLM(tiny_llama_config(hidden_size=192, heads=6, kv_heads=2))
    cfg = hybrid_config_from_teacher(teacher.config, variant="mamba1", attn_fraction=0.5,
                                     d_state=d_state)
    hd, rep = cfg.head_dim, cfg.repeat_group
    assert (hd, cfg.d_state, rep) == (32, d_state, 3)
    with torch.no_grad():
        for layer in teacher.model.layers:
            a = layer.self_attn
            for proj in (a.q_proj, a.k_proj, a.v_proj):
                proj.weight[:, 0] = torch.arange(proj.weight.shape[0])
            a.o_proj.weight[0] = torch.arange(a.o_proj.weight.shape[1])
    hybrid = init_hybrid_from_teacher(teacher, cfg)
    for i in cfg.mamba_layers:
        m = hybrid.model.layers[i].mamba
        q, o = m.C_proj.weight[:, 0].long(), m.out_proj.weight[0].long()
        k, v = m.repeat_groups(m.B_proj.weight[:, 0]).long(), m.repeat_groups(m.in_proj_x.weight[:, 0]).long()
        assert sorted(q.tolist()) == list(range(cfg.d_inner)) and torch.equal(q, o)
        assert torch.equal(q % hd, k % hd) and torch.equal(q // hd // rep, k // hd)
        assert torch.equal(o % hd, v % hd) and torch.equal(o // hd // rep, v // hd)
        assert m.conv1d.weight.abs().max() <= 0.5 and m.conv1d.weight.std() > 0.2
        dt = torch.nn.functional.softplus(2 * m.dt_proj.bias)
        assert dt.min() >= 1e-3 - 1e-6 and dt.max() <= 0.1 + 1e-6
    # the conv init is seeded like the rest of the mixer: same seed, same student
    again, other = (init_hybrid_from_teacher(teacher, cfg, seed=s) for s in (0, 1))
    i = cfg.mamba_layers[0]
    conv = [h.model.layers[i].mamba.conv1d.weight for h in (hybrid, again, other)]
    assert torch.equal(conv[0], conv[1]) and not torch.equal(conv[0], conv[2])


def test_paper_layouts_and_shapes():
    cfg2 = tiny_hybrid("mamba2").config
    m2 = LlamaMambaHybridForCausalLM(cfg2).model.layers[0].mamba
    assert m2.in_proj.weight.shape == (2 * cfg2.d_inner + 2 * cfg2.d_xb + cfg2.mamba_nheads, 64)
    assert m2.conv1d.weight.shape == (cfg2.d_inner + 2 * cfg2.d_xb, 1, 4)
    assert cfg2.d_state == cfg2.head_dim and cfg2.mamba_nheads == cfg2.num_attention_heads
    cfg1 = tiny_hybrid("mamba1").config
    m1 = LlamaMambaHybridForCausalLM(cfg1).model.layers[0].mamba
    assert cfg1.d_state == 16 and cfg1.dt_rank == 4 and cfg1.repeat_kv_before_conv
    assert m1.A_log.shape == (cfg1.d_inner, 16) and m1.conv1d.weight.shape == (cfg1.d_inner, 1, 4)
    assert torch.allclose(torch.exp(m1.A_log)[0, :3], torch.tensor([1.0, 2.0, 3.0]))


def test_mamba1_dt_bias_is_applied_twice():
    """The paper's checkpoints were trained with dt_proj.bias added twice; keep it."""
    model = tiny_hybrid("mamba1")
    mixer = model.model.layers[0].mamba
    h = torch.randn(1, 5, 64)
    base = mixer(h)
    with torch.no_grad():
        mixer.dt_proj.bias.add_(0.7)
    shifted = mixer(h)
    with torch.no_grad():
        mixer.dt_proj.bias.sub_(0.7)
        mixer.dt_proj.weight.zero_()
        mixer.dt_proj_down.weight.zero_()
    # with the low-rank part zeroed, dt = softplus(2 * bias): compare with a manual scan
    from vllm_mamba_hybrid.ops import selective_scan_fn
    out = mixer(h)
    x = mixer.repeat_groups(mixer.in_proj_x(h)).transpose(1, 2)
    from vllm_mamba_hybrid.ops import causal_conv1d_fn
    x, _ = causal_conv1d_fn(x, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias)
    B = mixer.repeat_groups(mixer.B_proj(h)).reshape(1, 5, -1, 16).permute(0, 2, 3, 1)
    C = mixer.C_proj(h).reshape(1, 5, -1, 16).permute(0, 2, 3, 1)
    delta = (2 * mixer.dt_proj.bias)[None, :, None].expand(1, -1, 5)
    y, _ = selective_scan_fn(x, delta, -torch.exp(mixer.A_log), B, C, mixer.D,
                             mixer.in_proj_z(h).transpose(1, 2), delta_softplus=True)
    assert torch.allclose(out, mixer.out_proj(y.transpose(1, 2)), atol=1e-5)
    assert not torch.allclose(base, shifted)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_gradients_reach_every_parameter(variant):
    model = tiny_hybrid(variant).train()
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 512, (2, 19))
    out = model(ids, labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "A_log" in n)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_auto_load_roundtrip(tmp_path, variant):
    model = tiny_hybrid(variant, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlamaMambaHybridForCausalLM
    ids = torch.randint(0, 512, (1, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="mamba_variant"):
        LlamaMambaHybridConfig(num_hidden_layers=4, mamba_variant="mamba3")
    with pytest.raises(ValueError, match=r"attn_layers \[7\] out of range"):
        LlamaMambaHybridConfig(num_hidden_layers=4, attn_layers=[1, 7])
    cfg = LlamaMambaHybridConfig(**{k: v for k, v in LlamaConfig(num_hidden_layers=8).to_dict().items()
                                    if k not in ("model_type", "architectures", "transformers_version")},
                                 attn_layers=[3, 7])
    assert cfg.mamba_layers == [0, 1, 2, 4, 5, 6]


@pytest.mark.gpu
@pytest.mark.parametrize("padding", ["right", "left"])
def test_mamba2_fla_training_path_equals_reference_gpu(monkeypatch, padding):
    """The training forward on fla's kernels (MAMBA_HYBRID_SCAN=fla) == the reference
    scan, logits on real tokens and every parameter's gradient, on a padded batch."""
    from vllm_mamba_hybrid.ops import fla_ssd
    reason = fla_ssd.unusable_reason(torch.empty(0, device="cuda", requires_grad=True))
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = tiny_hybrid("mamba2", hidden_size=128, heads=4).cuda().train()
    lengths = [70, 23, 130]
    width = max(lengths)
    ids = torch.randint(3, 512, (len(lengths), width), device="cuda")
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        if padding == "left":
            mask[i, width - n:] = 1
        else:
            mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    runs = {}
    for impl in ("reference", "fla"):
        monkeypatch.setenv("MAMBA_HYBRID_SCAN", impl)
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        runs[impl] = (out.logits[mask.bool()].detach(),
                      {n: p.grad.clone() for n, p in model.named_parameters()})
    (ref_logits, ref_grads), (logits, grads) = runs["reference"], runs["fla"]
    assert rel(logits, ref_logits) < 1e-4
    for name, g in ref_grads.items():
        assert rel(grads[name], g) < 1e-3 if g.norm() > 0 else grads[name].norm() < 1e-6, name
