"""Attention -> Mamba initialisation ("The Mamba in the Llama", Sec. 2).

A Mamba layer takes the replaced attention layer's projections: V -> x,
K -> B, Q -> C, O -> out_proj; z, dt, conv and A/D start as in Mamba. MLPs,
norms, embeddings and the head stay the teacher's. Attention biases, if the
teacher has them, have no Mamba counterpart and are dropped.
"""
from __future__ import annotations

import os
import weakref

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel

from ..config import MAMBA_VARIANTS, LlamaMambaHybridConfig, paper_attention_layers
from ..layout import mamba2_in_proj, row_slices
from ..modeling import LlamaMambaHybridForCausalLM
from .output_dir import atomic_output_dir
from .teacher import check_llama_family

MAMBA_INITS = ("attention", "random")
_NON_LLAMA_KEYS = ("model_type", "architectures", "transformers_version", "quantization_config")


def hybrid_config_from_teacher(teacher_config: PretrainedConfig, *, variant: str,
                               attn_layers: list[int] | None = None,
                               attn_fraction: float | None = None,
                               d_state: int | None = None,
                               **hybrid_fields) -> LlamaMambaHybridConfig:
    """The teacher's Llama fields plus the hybrid fields (layers from a list or a fraction;
    ``d_state`` None: the variant's default)."""
    check_llama_family(teacher_config)
    if variant not in MAMBA_VARIANTS:
        raise ValueError(f"unknown Mamba variant {variant!r}; choose one of {MAMBA_VARIANTS}")
    if (attn_layers is None) == (attn_fraction is None):
        raise ValueError("give exactly one of attn_layers or attn_fraction")
    n = teacher_config.num_hidden_layers
    if attn_layers is None:
        attn_layers = paper_attention_layers(n, attn_fraction)
    fields = {k: v for k, v in teacher_config.to_dict().items() if k not in _NON_LLAMA_KEYS}
    fields.update(hybrid_fields)
    if d_state is not None:
        fields["d_state"] = d_state
    return LlamaMambaHybridConfig(**fields, attn_layers=list(attn_layers), mamba_variant=variant,
                                  architectures=["LlamaMambaHybridForCausalLM"])


@torch.no_grad()
def map_attention_to_mamba(mixer: torch.nn.Module, attn: torch.nn.Module, config) -> None:
    """Copy the attention projections into a freshly built mixer (by value)."""
    q, k, v, o = (getattr(attn, f"{n}_proj").weight for n in "qkvo")
    if config.mamba_variant == "mamba2":
        rows = row_slices(mamba2_in_proj(config))      # [z | x | B | C | dt]
        for piece, weight in (("x", v), ("B", k), ("C", q)):
            mixer.in_proj.weight[rows[piece]].copy_(weight)
    else:
        channels = query_channels_for_repeated_groups(config)
        mixer.in_proj_x.weight.copy_(v)
        mixer.B_proj.weight.copy_(k)
        mixer.C_proj.weight.copy_(q[channels])
        o = o[:, channels]
        # PyTorch's default conv init (weights and bias ~ U(+-1/2) for 4 taps), as in
        # MambaInLlama: with no norm after the scan, HF's N(0, 0.02) leaves the layer's
        # output at ~0.5% of the attention output it replaces, a no-op.
        mixer.conv1d.reset_parameters()
    mixer.out_proj.weight.copy_(o)


def query_channels_for_repeated_groups(config) -> torch.Tensor:
    """For Mamba1's C (and out_proj's columns): the query channel each channel takes.

    Mamba1 repeats x (from V) and B (from K) in groups of ``d_state`` channels, so with
    ``d_state < head_dim`` group j sees the K/V sub-block ``(j // rep) % (head_dim //
    d_state)``, not the sub-block of Q row block j. Group j takes instead the same
    sub-block of one of the ``rep`` query heads that share that KV head, so that every
    channel scores q.k over matching dimensions and sends its V dimension to the
    matching O column, as attention does. The identity where d_state == head_dim.
    """
    hd, ds, rep = config.head_dim, config.d_state, config.repeat_group
    if hd % ds:
        return torch.arange(config.d_inner)
    sub_blocks = hd // ds
    channels = []
    for j in range(config.d_inner // ds):
        k_block = j // rep                           # the K/V group of d_state rows B/x take
        head = rep * (k_block // sub_blocks) + j % rep
        start = head * hd + (k_block % sub_blocks) * ds
        channels.extend(range(start, start + ds))
    return torch.tensor(channels)


@torch.no_grad()
def init_hybrid_from_teacher(teacher: PreTrainedModel, hybrid_config: LlamaMambaHybridConfig, *,
                             mamba_init: str = "attention",
                             previous: LlamaMambaHybridForCausalLM | None = None,
                             seed: int = 0) -> LlamaMambaHybridForCausalLM:
    """Build a hybrid from a teacher (or, for progressive replacement, from ``previous``).

    With ``previous`` (an earlier, partly trained stage) every tensor comes from it:
    layers that are Mamba in both keep their trained mixer, newly replaced layers
    are mapped from previous's attention weights, and the rest is copied.
    """
    if mamba_init not in MAMBA_INITS:
        raise ValueError(f"unknown mamba_init {mamba_init!r}; choose one of {MAMBA_INITS}")
    source = previous if previous is not None else teacher
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hybrid = LlamaMambaHybridForCausalLM(hybrid_config)
    dtype = next(source.parameters()).dtype
    hybrid.to(dtype)

    src_layers = source.model.layers
    target_state = hybrid.state_dict()
    copied = {}
    for name, tensor in source.state_dict().items():
        if name in target_state and target_state[name].shape == tensor.shape:
            copied[name] = tensor
    for i, layer in enumerate(hybrid.model.layers):
        if layer.is_attention:
            continue
        src = src_layers[i]
        if hasattr(src, "mamba"):   # Mamba in both: keep the trained mixer (already copied)
            continue
        # newly replaced layer: drop the source's attention tensors, map them instead
        copied = {k: v for k, v in copied.items() if not k.startswith(f"model.layers.{i}.self_attn.")}
        if mamba_init == "attention":
            with torch.random.fork_rng():               # seeded like the mixers themselves
                torch.manual_seed(seed + 1 + i)
                map_attention_to_mamba(layer.mamba, src.self_attn, hybrid_config)
    missing = hybrid.load_state_dict(copied, strict=False).missing_keys
    unexpected_missing = [k for k in missing if ".mamba." not in k
                          and not (hybrid_config.tie_word_embeddings and k == "lm_head.weight")]
    if unexpected_missing:
        raise ValueError(f"teacher lacks tensors the hybrid needs: {unexpected_missing[:8]}")
    if hybrid_config.tie_word_embeddings:
        hybrid.tie_weights()
    hybrid.generation_config = source.generation_config
    return hybrid


_HYBRID_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def as_hybrid(model) -> LlamaMambaHybridForCausalLM:
    """The model itself if it is a hybrid; for a Llama teacher, an all-attention hybrid
    whose parameters *are* the teacher's tensors (zero-copy; same logits)."""
    if isinstance(model, LlamaMambaHybridForCausalLM):
        return model
    if model in _HYBRID_VIEWS:
        return _HYBRID_VIEWS[model]
    n = model.config.num_hidden_layers
    cfg = hybrid_config_from_teacher(model.config, variant="mamba2", attn_layers=list(range(n)))
    with torch.device("meta"):
        hybrid = LlamaMambaHybridForCausalLM(cfg)
    hybrid.load_state_dict(model.state_dict(), strict=False, assign=True)
    hybrid.model.rotary_emb = model.model.rotary_emb
    if cfg.tie_word_embeddings:
        hybrid.lm_head.weight = hybrid.model.embed_tokens.weight
    left = [k for k, p in hybrid.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"teacher lacks tensors for {left[:4]}")
    hybrid.generation_config = model.generation_config
    _HYBRID_VIEWS[model] = hybrid.eval()
    return hybrid


def save_hybrid(model: PreTrainedModel, out_dir: str | os.PathLike, *,
                tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False):
    """Write model (safetensors), config, generation config and tokenizer atomically."""
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_dir is not None:
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    return out_dir
