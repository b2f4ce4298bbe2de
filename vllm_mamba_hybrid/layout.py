"""The mixers' weight layout, stated once: split orders, stacked names, checkpoint shapes.

Every implementation reads it: the reference modules (``modeling/``), the vLLM model
(``model_executor/``), the attention -> Mamba initialisation (``conversion/init.py``) and
the fast runtime (``runtime/``). Names are the paper's (MambaInLlama), so its
checkpoints load unchanged.

* Mamba2: one ``in_proj`` whose rows are ``[z d_inner | x d_xb | B d_xb | C d_inner |
  dt nheads]``; the causal conv runs over the ``x|B|C`` rows.
* Mamba1: separate ``in_proj_x`` (d_xb), ``in_proj_z`` (d_inner), ``B_proj`` (d_xb),
  ``C_proj`` (d_inner) and the low-rank ``dt_proj_down`` -> ``dt_proj``; vLLM stacks the
  four in that order into one GEMM.

Pure Python on purpose (no torch, no transformers): a config-like object with the
hybrid fields (``LlamaMambaHybridConfig``) is all it reads.
"""
from __future__ import annotations

MAMBA1_PROJECTIONS = ("in_proj_x", "in_proj_z", "B_proj", "C_proj")
"""Mamba1's input projections in the order vLLM stacks them (``in_proj`` shards 0..3)."""

A_LOG = ".mamba.A_log"
A_PARAM = ".mamba.A"
"""The checkpoint stores ``A_log``; vLLM's mixers hold ``A = -exp(A_log)`` under this name."""

STACKED_PARAMS = (
    # (checkpoint name piece, vLLM parameter piece, shard id)
    (".self_attn.q_proj.", ".self_attn.qkv_proj.", "q"),
    (".self_attn.k_proj.", ".self_attn.qkv_proj.", "k"),
    (".self_attn.v_proj.", ".self_attn.qkv_proj.", "v"),
    (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0),
    (".mlp.up_proj.", ".mlp.gate_up_proj.", 1),
    *((f".mamba.{name}.", ".mamba.in_proj.", shard) for shard, name in enumerate(MAMBA1_PROJECTIONS)),
)
"""Checkpoint tensors that vLLM loads as shards of one stacked GEMM."""


def mamba2_in_proj(config) -> dict[str, int]:
    """Mamba2's ``in_proj`` rows, in order: name -> size."""
    return {"z": config.d_inner, "x": config.d_xb, "B": config.d_xb, "C": config.d_inner,
            "dt": config.d_inner // config.d_state}


def mamba2_in_proj_parts(config) -> dict[str, int]:
    """``in_proj`` as the mixers split it first: z, the conv's input ``xBC``, dt."""
    rows = mamba2_in_proj(config)
    return {"z": rows["z"], "xBC": rows["x"] + rows["B"] + rows["C"], "dt": rows["dt"]}


def mamba2_conv_channels(config) -> dict[str, int]:
    """Mamba2's conv channels, in order (the ``x|B|C`` rows of ``in_proj``)."""
    rows = mamba2_in_proj(config)
    return {name: rows[name] for name in ("x", "B", "C")}


def mamba1_projections(config) -> dict[str, int]:
    """Mamba1's stacked input projections, in order: module name -> output size."""
    return dict(zip(MAMBA1_PROJECTIONS, (config.d_xb, config.d_inner, config.d_xb, config.d_inner)))


def row_slices(sizes: dict[str, int]) -> dict[str, slice]:
    """Each named piece's rows in the stacked tensor."""
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = slice(start, start + size)
        start += size
    return out


def shard_sizes(sizes: dict[str, int], tp_size: int) -> list[int]:
    """Per-rank sizes of a column-parallel stack (each piece split evenly)."""
    bad = [name for name, size in sizes.items() if size % tp_size]
    if bad:
        raise ValueError(f"tensor_parallel_size={tp_size} does not divide {bad} ({sizes})")
    return [size // tp_size for size in sizes.values()]


def mamba_tp_groups(config) -> int:
    """The Mamba layers' x/B groups (``d_xb // d_state``; for mamba2 the key/value heads):
    the unit a tensor-parallel rank must hold whole, since every SSM head reads the x and
    B of its own group (GQA) and the rank's z/C/dt/A/D rows follow the same split."""
    return config.d_xb // config.d_state


def check_tensor_parallel_size(config, tp_size: int) -> None:
    """Refuse a ``tensor_parallel_size`` the Mamba layers cannot be split over, naming both
    numbers. Dividing the x/B groups also divides the SSM heads, ``d_inner``, the conv
    channels and (mamba2) the gated norm's per-head groups, which are multiples of them."""
    groups = mamba_tp_groups(config)
    if tp_size < 1 or groups % tp_size:
        what = "num_key_value_heads" if config.mamba_variant == "mamba2" else "d_xb / d_state"
        raise ValueError(
            f"tensor_parallel_size={tp_size} does not divide the {groups} x/B groups of the "
            f"{config.mamba_variant} layers ({what}: d_xb={config.d_xb}, "
            f"d_state={config.d_state}); each rank must hold whole groups, so use a "
            f"tensor_parallel_size that divides {groups}")


def checkpoint_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor a hybrid checkpoint must contain, with its (unsharded) shape."""
    h, v = config.hidden_size, config.vocab_size
    hd = config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    di, n, w = config.d_inner, config.d_state, config.d_conv
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h),
                                          "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name in ("gate_proj", "up_proj"):
            shapes[f"{p}mlp.{name}.weight"] = (config.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, config.intermediate_size)
        if getattr(config, "mlp_bias", False):
            shapes[p + "mlp.gate_proj.bias"] = shapes[p + "mlp.up_proj.bias"] = (
                config.intermediate_size,)
            shapes[p + "mlp.down_proj.bias"] = (h,)
        if config.is_attention_layer(i):
            a = p + "self_attn."
            shapes.update({a + "q_proj.weight": (q, h), a + "k_proj.weight": (kv, h),
                           a + "v_proj.weight": (kv, h), a + "o_proj.weight": (h, q)})
            if config.attention_bias:
                shapes.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,),
                               a + "v_proj.bias": (kv,), a + "o_proj.bias": (h,)})
            continue
        m = p + "mamba."
        shapes[m + "conv1d.weight"] = (config.conv_dim, 1, w)
        if config.conv_bias:
            shapes[m + "conv1d.bias"] = (config.conv_dim,)
        shapes[m + "out_proj.weight"] = (h, di)
        if config.mamba_variant == "mamba2":
            nh = config.mamba_nheads
            shapes.update({m + "in_proj.weight": (sum(mamba2_in_proj(config).values()), h),
                           m + "dt_bias": (nh,), m + "A_log": (nh,), m + "D": (nh,),
                           m + "norm.weight": (di,)})
        else:
            r = config.dt_rank
            shapes.update({f"{m}{name}.weight": (size, h)
                           for name, size in mamba1_projections(config).items()})
            shapes.update({m + "dt_proj_down.weight": (r, h), m + "dt_proj.weight": (di, r),
                           m + "dt_proj.bias": (di,), m + "A_log": (di, n), m + "D": (di,)})
    return shapes
