"""Reference hybrid model: the teacher's Llama stack with Mamba mixers in place of
attention in the layers not listed in ``config.attn_layers``.

This is the project's ground truth (vLLM outputs and fast paths are compared
with it) and the model that distillation trains: plain PyTorch, differentiable,
incremental decoding with O(1) work per token in Mamba layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from ..config import LlamaMambaHybridConfig
from .attention import HybridAttention
from .cache import HybridCache
from .mamba1_mixer import Mamba1Mixer
from .mamba2_mixer import Mamba2Mixer

MIXERS = {"mamba1": Mamba1Mixer, "mamba2": Mamba2Mixer}


class HybridDecoderLayer(nn.Module):
    """Pre-norm residual block; the mixer is ``self_attn`` or ``mamba`` (the paper's names)."""

    def __init__(self, config: LlamaMambaHybridConfig, layer_idx: int):
        super().__init__()
        self.is_attention = config.is_attention_layer(layer_idx)
        if self.is_attention:
            self.self_attn = HybridAttention(config, layer_idx)
        else:
            self.mamba = MIXERS[config.mamba_variant](config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attn_mask, token_mask, cache_entry):
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        if self.is_attention:
            h = self.self_attn(h, position_embeddings, attn_mask, cache_entry)
        else:
            h = self.mamba(h, cache_entry, token_mask)
        hidden_states = residual + h
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaMambaHybridPreTrainedModel(PreTrainedModel):
    config_class = LlamaMambaHybridConfig
    config: LlamaMambaHybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (Mamba1Mixer, Mamba2Mixer)):
            module.reset_ssm_parameters()


def _attention_mask(attention_mask, past_len, q_len, device):
    """Boolean (b, 1, q, kv) mask: causal, padding keys hidden, and every query may see
    itself (so padded query rows stay finite). None when plain causal attention is exact."""
    if attention_mask is None or bool(attention_mask.all()):
        return None if past_len == 0 or q_len == 1 else _causal(past_len, q_len, device)[None, None]
    keys_valid = attention_mask.bool()[:, None, None, :]
    causal = _causal(past_len, q_len, device)[None, None]
    diagonal = torch.zeros_like(causal)
    diagonal[..., torch.arange(q_len), past_len + torch.arange(q_len)] = True
    return (causal & keys_valid) | diagonal


def _causal(past_len, q_len, device):
    q = torch.arange(q_len, device=device)[:, None] + past_len
    k = torch.arange(past_len + q_len, device=device)[None, :]
    return k <= q


class LlamaMambaHybridModel(LlamaMambaHybridPreTrainedModel):
    def __init__(self, config: LlamaMambaHybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values: HybridCache | None = None, inputs_embeds=None, use_cache=None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, q_len, _ = hidden.shape
        if use_cache and past_key_values is None:
            past_key_values = HybridCache(self.config)
        past_len = past_key_values.seen_tokens if past_key_values is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past_len + q_len:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected "
                             f"{past_len + q_len} (cached {past_len} + new {q_len})")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = torch.arange(past_len, past_len + q_len, device=hidden.device)[None]
        attn_mask = _attention_mask(attention_mask, past_len, q_len, hidden.device)
        token_mask = None
        if attention_mask is not None and not bool(attention_mask[:, -q_len:].all()):
            token_mask = attention_mask[:, -q_len:]
        position_embeddings = self.rotary_emb(hidden, position_ids)

        for i, layer in enumerate(self.layers):
            entry = past_key_values.layers[i] if past_key_values is not None else None
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(layer, hidden, position_embeddings, attn_mask, token_mask, entry,
                                    use_reentrant=False)
            else:
                hidden = layer(hidden, position_embeddings, attn_mask, token_mask, entry)
        if past_key_values is not None:
            past_key_values.seen_tokens += q_len
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden),
                                       past_key_values=past_key_values)


class LlamaMambaHybridForCausalLM(LlamaMambaHybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaMambaHybridConfig):
        super().__init__(config)
        self.model = LlamaMambaHybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id=None, pad_token_id=None,
                 generation_config: GenerationConfig | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Batched incremental decoding (left-padded prompts), HF ``generate`` semantics for
        the common arguments: returns prompt + new tokens, pad after a row's EOS.

        Attention layers append to a KV cache; Mamba layers carry their conv/SSM
        state, so each new token costs O(1) in them.

        The static-cache runtime (CUDA graphs and Triton kernels on a GPU, speculative
        decoding) is ``vllm_mamba_hybrid.runtime.fast_generate(model, ...)``, same contract.
        """
        gc = generation_config or self.generation_config or GenerationConfig()
        max_new_tokens = max_new_tokens if max_new_tokens is not None else (gc.max_new_tokens or 20)
        do_sample = gc.do_sample if do_sample is None else do_sample
        temperature = gc.temperature if temperature is None else temperature
        top_k = gc.top_k if top_k is None else top_k
        top_p = gc.top_p if top_p is None else top_p
        eos, pad = resolve_eos_and_pad(self, eos_token_id, pad_token_id, input_ids.device, gc)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.eval()
        cache = HybridCache(self.config)
        logits = self(input_ids, attention_mask=attention_mask, past_key_values=cache,
                      use_cache=True, logits_to_keep=1).logits[:, -1]
        next_pos = (attention_mask.long().sum(-1, keepdim=True))
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        pieces = [input_ids]
        for step in range(max_new_tokens):
            token = choose_next_token(logits, do_sample, temperature, top_k, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            pieces.append(token[:, None])
            finished |= torch.isin(token, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(token[:, None])], dim=1)
            logits = self(token[:, None], attention_mask=attention_mask, position_ids=next_pos,
                          past_key_values=cache, use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
        return torch.cat(pieces, dim=1)


def resolve_eos_and_pad(model, eos_token_id, pad_token_id, device, generation_config=None):
    """EOS ids (a tensor, possibly empty) and the pad id, with HF generate()'s defaults."""
    gc = generation_config or model.generation_config or GenerationConfig()
    eos = eos_token_id if eos_token_id is not None else (gc.eos_token_id or model.config.eos_token_id)
    eos = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                       device=device, dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (
        gc.pad_token_id if gc.pad_token_id is not None else (int(eos[0]) if len(eos) else 0))
    return eos, pad


def choose_next_token(logits, do_sample, temperature, top_k, top_p, generator):
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature or 1.0, 1e-5)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
