"""Fast batched generation: reference prefill, static cache, CUDA-graph decode step.

The runtime drives the model's own modules and parameters (nothing is copied):

* prefill: the reference forward (chunked scan, SDPA) over the left-padded prompts,
  whose HybridCache is then moved into a :class:`StaticHybridCache`;
* decode: one step over static buffers. On CPU (or ``use_triton=False``) each
  layer is the reference ``HybridDecoderLayer`` itself with adapters that read and
  write the static cache; on CUDA the same math runs as fused Triton kernels
  (``ops/triton_step.py``) around cuBLAS projections, captured in a CUDA graph.

A plain transformers ``LlamaForCausalLM`` goes through ``conversion.init.as_hybrid``
(an all-attention hybrid sharing the teacher's tensors), so teacher and hybrid are
timed by the same code.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..conversion.init import as_hybrid
from ..modeling import HybridCache, Mamba1Mixer, MambaLayerState
from ..modeling.modeling_hybrid import choose_next_token, resolve_eos_and_pad
from ..ops import triton_step as ts
from .static_cache import StaticHybridCache

_FUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fused_projection(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One GEMM instead of several on the same input: the Linears' weights (and biases)
    concatenated once, each Linear's parameter re-pointed at its slice (same values, no
    second copy). Kept per first Linear, so a second call returns the same tensors."""
    cached = _FUSED.get(linears[0])
    if cached is not None and cached[0].data_ptr() == linears[0].weight.data_ptr():
        return cached
    biases = [l.bias is not None for l in linears]
    if any(biases) and not all(biases):
        raise ValueError("cannot fuse projections of which only some have a bias")
    with torch.no_grad():
        weight = torch.cat([l.weight.detach() for l in linears])
        bias = torch.cat([l.bias.detach() for l in linears]) if all(biases) else None
        off = 0
        for l in linears:
            rows = l.weight.shape[0]
            l.weight.data = weight[off:off + rows]
            if bias is not None:
                l.bias.data = bias[off:off + rows]
            off += rows
    _FUSED[linears[0]] = (weight, bias)
    return weight, bias


def layer_projections(layer) -> dict[str, list[torch.nn.Linear]]:
    """The Linears of one decoder layer that share an input: q|k|v (attention) or
    Mamba1's input projections, and the MLP's gate|up."""
    if layer.is_attention:
        a = layer.self_attn
        first = [a.q_proj, a.k_proj, a.v_proj]
    elif isinstance(layer.mamba, Mamba1Mixer):
        first = layer.mamba.input_projections()
    else:
        first = []
    return {"mixer": first, "gate_up": [layer.mlp.gate_proj, layer.mlp.up_proj]}


def capture_graph(fn, warmup: int = 2):
    """Run ``fn`` on a side stream (compiles kernels, sets up cuBLAS), then capture it.
    The warm-up runs mutate the caller's buffers: capture before loading real state."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class _StaticKV:
    """KVCacheEntry look-alike: HybridAttention appends (b, kvh, t, d) keys at slots
    ``slots`` (b, t) of the static buffers and attends over all of them (masked)."""

    def __init__(self, key, value, rows, slots):
        self.key, self.value, self.rows, self.slots = key, value, rows, slots

    def append(self, k, v):
        self.key[self.rows, :, self.slots] = k.permute(0, 2, 1, 3).to(self.key.dtype)
        self.value[self.rows, :, self.slots] = v.permute(0, 2, 1, 3).to(self.value.dtype)
        return self.key, self.value


def finish_rows(input_ids, tokens, eos, pad):
    """Reference generate()'s output: pad after each row's first EOS, stop at the step
    where every row has finished (or at the budget)."""
    steps = tokens.shape[1]
    is_eos = torch.isin(tokens, eos)
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    tokens = tokens.masked_fill(after, pad)
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], steps,
                                                                                   dtype=torch.long))
    length = int(first.max()) if steps else 0
    return torch.cat([input_ids, tokens[:, :length]], dim=1)


class FastGenerator:
    """Generation for one model at a fixed batch size and cache length.

    ``forward(ids)`` feeds (batch, t) tokens at the rows' cache ends and returns
    their logits; with ``use_cuda_graph`` each t is a captured graph (captured in
    ``__init__`` for t = 1, before any real state exists). ``history`` > 0 keeps the
    Mamba states of the last tokens for speculative rollback.
    """

    def __init__(self, model, batch_size: int, max_len: int, *, history: int = 0,
                 use_cuda_graph: bool | None = None, use_triton: bool | None = None,
                 attention_splits: int | None = None):
        self.model = as_hybrid(model).eval()
        self.head = self.model.lm_head   # a draft's may be cut to fewer tokens (speculative.py)
        cfg = self.config = self.model.config
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.batch_size, self.max_len = batch_size, max_len
        triton_ok = (ts.available(self.device) and cfg.d_conv == 4 and cfg.hidden_act == "silu")
        self.use_triton = triton_ok if use_triton is None else (use_triton and triton_ok)
        self.use_graph = (self.device.type == "cuda") if use_cuda_graph is None else use_cuda_graph
        self.cache = StaticHybridCache(cfg, batch_size, max_len, self.dtype, self.device, history)
        self.attention_splits = attention_splits
        self._fused = [{name: fused_projection(linears) for name, linears in
                        layer_projections(layer).items() if linears}
                       for layer in self.model.model.layers] if self.use_triton else []
        self._offs = torch.arange(64, device=self.device)
        self._key_slots = torch.arange(max_len, device=self.device)
        self._rows = torch.arange(batch_size, device=self.device)[:, None]
        self._graphs: dict = {}
        if self.use_graph:
            self.capture(1)

    # ---- one model step over the static cache ------------------------------------
    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, record: bool = False) -> torch.Tensor:
        c, m = self.cache, self.model.model
        t = ids.shape[1]
        offs = self._offs[:t]
        hidden = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(hidden, (c.end - c.start)[:, None] + offs)
        if self.use_triton:
            hidden = self._layers_triton(hidden, cos.contiguous(), sin.contiguous(), record)
        else:
            hidden = self._layers_reference(hidden, (cos, sin), record)
        logits = self.head(hidden)
        c.end += t
        if record:
            c.hist_pos += t
        return logits

    def _layers_reference(self, hidden, pos_emb, record):
        """The reference layers themselves, reading/writing the static cache."""
        c = self.cache
        t = hidden.shape[1]
        slots = c.end[:, None] + self._offs[:t]
        j = self._key_slots
        mask = ((j >= c.start[:, None, None]) & (j <= slots[:, :, None]))[:, None]
        for i, layer in enumerate(self.model.model.layers):
            if layer.is_attention:
                hidden = layer(hidden, pos_emb, mask, None, _StaticKV(c.key[i], c.value[i], self._rows, slots))
                continue
            outs = []
            for k in range(t):   # one token at a time: the state after each is kept
                state = MambaLayerState(c.conv[i], c.ssm[i])
                outs.append(layer(hidden[:, k:k + 1], None, None, None, state))
                c.conv[i].copy_(state.conv)
                c.ssm[i].copy_(state.ssm)
                if record:
                    c.record(i, k)
            hidden = torch.cat(outs, 1)
        return self.model.model.norm(hidden)

    def _layers_triton(self, x, cos, sin, record):
        res, h = x, None
        for i, layer in enumerate(self.model.model.layers):
            ln = layer.input_layernorm
            res, n = ts.add_rmsnorm(res, h, ln.weight, ln.variance_epsilon)
            fused = self._fused[i]
            if layer.is_attention:
                o = self._attention(i, layer.self_attn, F.linear(n, *fused["mixer"]), cos, sin)
            elif self.config.mamba_variant == "mamba2":
                o = self._mamba2(i, layer.mamba, n, record)
            else:
                o = self._mamba1(i, layer.mamba, F.linear(n, *fused["mixer"]), record)
            ln = layer.post_attention_layernorm
            res, n = ts.add_rmsnorm(res, o, ln.weight, ln.variance_epsilon)
            h = layer.mlp.down_proj(ts.silu_mul(F.linear(n, *fused["gate_up"])))
        norm = self.model.model.norm
        return ts.add_rmsnorm(res, h, norm.weight, norm.variance_epsilon)[1]

    def _attention(self, i, attn, qkv, cos, sin):
        c = self.cache
        q = ts.rope_write(qkv, cos, sin, c.key[i], c.value[i], c.end, attn.num_heads)
        o = ts.decode_attention(q, c.key[i], c.value[i], c.start, c.end, self.attention_splits)
        return attn.o_proj(o.flatten(2))

    def _mamba2(self, i, mx, n, record):
        c = self.cache
        z, xbc, dt = mx.project(n)
        weight = mx.conv1d.weight.view(mx.conv_dim, -1)
        ys = []
        for k in range(n.shape[1]):
            xbc_k = ts.conv_step(xbc[:, k], c.conv[i], weight, mx.conv1d.bias)
            ys.append(ts.ssd_step(c.ssm[i], xbc_k, dt[:, k], z[:, k], mx.A_log, mx.D, mx.dt_bias,
                                  mx.norm.weight, mx.norm.eps, mx.d_xb))
            if record:
                c.record(i, k)
        return mx.out_proj(torch.stack(ys, 1))

    def _mamba1(self, i, mx, projected, record):
        c = self.cache
        x, z, B, C, dt_low = projected.split(
            [l.out_features for l in mx.input_projections()], dim=-1)
        dt = mx.dt_proj(dt_low)          # includes dt_proj.bias once; the kernel adds it again
        weight = mx.conv1d.weight.view(mx.conv_dim, -1)
        ys = []
        for k in range(projected.shape[1]):
            if mx.repeat_kv_before_conv:
                xc = ts.conv_step(x[:, k], c.conv[i], weight, mx.conv1d.bias, mx.d_state, mx.repeat_group)
            else:
                xc = mx.repeat_groups(ts.conv_step(x[:, k], c.conv[i], weight, mx.conv1d.bias)).contiguous()
            ys.append(ts.selective_step(c.ssm[i], xc, dt[:, k], mx.dt_proj.bias, mx.A_log, B[:, k], C[:, k],
                                        mx.D, z[:, k], mx.repeat_group))
            if record:
                c.record(i, k)
        return mx.out_proj(torch.stack(ys, 1))

    # ---- graphs -----------------------------------------------------------------
    def capture(self, t: int, record: bool = False) -> None:
        """Capture the t-token step; resets the cache (call before prefill)."""
        ids = torch.zeros(self.batch_size, t, dtype=torch.long, device=self.device)
        graph, logits = capture_graph(lambda: self._forward(ids, record))
        self._graphs[(t, record)] = (graph, ids, logits)
        self.cache.end.zero_()
        self.cache.hist_pos.zero_()

    def forward(self, ids: torch.Tensor, record: bool = False) -> torch.Tensor:
        entry = self._graphs.get((ids.shape[1], record)) if self.use_graph else None
        if entry is None:
            return self._forward(ids, record)
        graph, static_ids, logits = entry
        static_ids.copy_(ids)
        graph.replay()
        return logits

    # ---- generation -------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reference forward over the prompts; returns the last position's logits (b, vocab)."""
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(f"generator built for batch {self.batch_size}, got {input_ids.shape[0]}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ref = HybridCache(self.config)
        logits = self.model(input_ids, attention_mask=attention_mask, past_key_values=ref,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        self.cache.load_prefill(ref, attention_mask)
        return logits

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id=None, pad_token_id=None,
                 generator: torch.Generator | None = None, check_every: int = 8,
                 return_logits: bool = False):
        """Same contract as the reference ``generate``: prompt + new tokens, pad after EOS.
        Finished rows are checked every ``check_every`` steps (one host sync each)."""
        width = input_ids.shape[1]
        if width + max_new_tokens > self.max_len:
            raise ValueError(f"{width} + {max_new_tokens} tokens exceed the cache ({self.max_len})")
        eos, pad = resolve_eos_and_pad(self.model, eos_token_id, pad_token_id, input_ids.device)
        logits = self.prefill(input_ids, attention_mask)
        b = input_ids.shape[0]
        tokens = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
        finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        seen = []
        for step in range(max_new_tokens):
            if return_logits:
                seen.append(logits.float().clone())
            token = choose_next_token(logits, do_sample, temperature, top_k, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            tokens[:, step] = token
            finished |= torch.isin(token, eos)
            if step == max_new_tokens - 1 or ((step + 1) % check_every == 0 and bool(finished.all())):
                tokens = tokens[:, :step + 1]
                break
            logits = self.forward(token[:, None])[:, -1]
        out = finish_rows(input_ids, tokens, eos, pad)
        return (out, torch.stack(seen, 1)) if return_logits else out
