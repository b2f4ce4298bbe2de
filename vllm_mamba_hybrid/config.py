"""Configuration of a Llama/Mamba hybrid checkpoint.

One ``config.json`` carries the teacher's Llama fields unchanged plus the hybrid
fields, so a checkpoint never needs its teacher to load. Everything derivable
(d_inner, d_xb, d_state, dt_rank, ...) is filled in from the Llama fields with
the defaults of "The Mamba in the Llama" (MambaInLlama's training scripts), and
written out explicitly so the file documents the layout.
"""
from __future__ import annotations

import math
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .layout import mamba2_conv_channels

MAMBA_VARIANTS = ("mamba1", "mamba2")


def paper_attention_layers(num_layers: int, attn_fraction: float) -> list[int]:
    """Layers the paper keeps as attention for a given fraction.

    50% -> odd indices [1, 3, 5, ...]; 25% -> [3, 7, 11, ...]; 12.5% -> [7, 15, ...]:
    every ``1/fraction``-th layer, counted from the end of each stride.
    """
    if not 0.0 <= attn_fraction <= 1.0:
        raise ValueError(f"attn_fraction must lie in [0, 1], got {attn_fraction}")
    if attn_fraction == 0.0:
        return []
    if attn_fraction == 1.0:
        return list(range(num_layers))
    stride = 1.0 / attn_fraction
    if abs(stride - round(stride)) < 1e-9:
        stride = int(round(stride))
        return list(range(stride - 1, num_layers, stride))
    # Non-integer strides (e.g. 0.75): spread the kept layers evenly, ending on the last.
    n_keep = max(1, round(num_layers * attn_fraction))
    return sorted({num_layers - 1 - int(round(i * num_layers / n_keep)) for i in range(n_keep)})


def check_attn_layers(attn_layers, num_layers: int, name: str = "attn_layers") -> list[int]:
    """The one check of a layer list: integers in 0..num_layers-1, no duplicates;
    returns them sorted. Raises ValueError naming the offending entries."""
    try:
        layers = [int(i) for i in attn_layers]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of layer indices, got {attn_layers!r}") from None
    if any(isinstance(i, bool) or float(i) != int(i) for i in attn_layers):
        raise ValueError(f"{name} must be integer layer indices, got {list(attn_layers)}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{name} {bad} out of range: the model has {num_layers} layers "
                         f"(valid 0..{num_layers - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} has duplicates: {layers}")
    return sorted(layers)


@strict(accept_kwargs=True)
class LlamaMambaHybridConfig(LlamaConfig):
    """LlamaConfig plus the Mamba mixer fields.

    Layers listed in ``attn_layers`` keep Llama attention; all others use a Mamba
    mixer of ``mamba_variant``:

    * ``mamba2`` ("Mamba2InLlama"): one SSM head per attention head,
      ``d_state = head_dim``, conv over ``x||B||C`` before the GQA repeat.
    * ``mamba1`` ("MambaInLlama"): separate x/z/B/C/dt projections,
      ``d_state = 16`` by default (``head_dim`` makes each B/C group one attention
      head), GQA repeat of x before the conv, double dt bias.
    """

    model_type = "llama_mamba_hybrid"

    attn_layers: list[int] | None = None
    mamba_variant: str = "mamba2"
    d_inner: int | None = None
    d_xb: int | None = None
    d_state: int | None = None
    d_conv: int = 4
    dt_rank: int | None = None
    conv_bias: bool = True
    repeat_kv_before_conv: bool | None = None
    ssm_chunk_size: int = 128
    mamba_norm_eps: float = 1e-5

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.architectures:
            self.architectures = ["LlamaMambaHybridForCausalLM"]
        if self.mamba_variant not in MAMBA_VARIANTS:
            raise ValueError(
                f"mamba_variant must be one of {MAMBA_VARIANTS}, got {self.mamba_variant!r}")
        n = self.num_hidden_layers
        if self.attn_layers is None:
            self.attn_layers = paper_attention_layers(n, 0.5)
        self.attn_layers = check_attn_layers(self.attn_layers, n)

        head_dim = self.head_dim
        if self.d_inner is None:
            self.d_inner = self.num_attention_heads * head_dim
        if self.d_xb is None:
            self.d_xb = self.num_key_value_heads * head_dim
        if self.d_state is None:
            self.d_state = head_dim if self.mamba_variant == "mamba2" else 16
        if self.mamba_variant == "mamba1" and self.dt_rank is None:
            self.dt_rank = math.ceil(self.hidden_size / 16)
        if self.repeat_kv_before_conv is None:
            self.repeat_kv_before_conv = self.mamba_variant == "mamba1"
        self._check_mamba_shapes()

    def _check_mamba_shapes(self) -> None:
        if self.d_state < 1:
            raise ValueError(f"d_state must be a positive integer, got {self.d_state}")
        if self.d_xb % self.d_state or self.d_inner % self.d_state:
            raise ValueError(
                f"d_xb ({self.d_xb}) and d_inner ({self.d_inner}) must be multiples of "
                f"d_state ({self.d_state})")
        if self.d_inner % self.d_xb:
            raise ValueError(
                f"d_inner ({self.d_inner}) must be a multiple of d_xb ({self.d_xb}) for the GQA repeat")
        if self.mamba_variant == "mamba2" and self.repeat_kv_before_conv:
            raise ValueError("mamba2 layers use repeat_kv_before_conv=False (the paper's layout)")

    # ---- derived quantities used by every implementation -------------------------
    @property
    def mamba_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if i not in self.attn_layers]

    def is_attention_layer(self, idx: int) -> bool:
        return idx in self.attn_layers

    @property
    def mamba_chunk_size(self) -> int:
        """The name vLLM's Mamba metadata builder reads the scan chunk size under."""
        return self.ssm_chunk_size

    @property
    def layers_block_type(self) -> list[str]:
        """Per-layer "attention" / "mamba", the field vLLM's hybrid helpers count layers by."""
        return ["attention" if i in self.attn_layers else "mamba" for i in range(self.num_hidden_layers)]

    @property
    def mamba_nheads(self) -> int:
        """Mamba2: number of SSM heads (= attention heads, each head_dim x d_state)."""
        return self.d_inner // self.d_state

    @property
    def repeat_group(self) -> int:
        """How many times each x/B group (of d_state channels) is repeated (GQA)."""
        return self.d_inner // self.d_xb

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv1d."""
        if self.mamba_variant == "mamba2":
            return sum(mamba2_conv_channels(self).values())
        return self.d_inner if self.repeat_kv_before_conv else self.d_xb


Variant = Literal["mamba1", "mamba2"]
