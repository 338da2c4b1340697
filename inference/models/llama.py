"""The Llama family: Llama (incl. llama3 rope scaling), Mistral, Qwen2, Qwen3.

One decoder covers all four; they differ only in flags read from the
Hugging Face config:
- Qwen2 always has a bias on q/k/v; Llama/Mistral/Qwen3 follow `attention_bias`.
- Qwen3 RMS-normalizes q and k per head before rotary embedding.
- Tied embeddings reuse `embed_tokens.weight` as the LM head.

q/k/v and gate/up are fused into one matmul each (the loader concatenates the
checkpoint's separate weights). The forward takes flattened tokens of many
requests at once; attention goes through `inference.attention`.

Under tensor parallelism each rank builds its part (`inference.parallel.layers`):
its query and KV heads, its rows of gate_up, its vocab shard; o_proj and down
all-reduce, the logits are gathered. With one rank these are the plain layers.

Norms, rotary and SiLU-mul go through `kernels` (fused Triton kernels on CUDA,
torch references that match transformers bit for bit in float32 on the CPU).
The residual stream is passed vLLM-style, `layer(x, residual) -> (x,
residual)`, so that each residual add is fused into the norm after it. The
forward has no host syncs and no branching on tensor values (it is captured in
a CUDA graph); the only branch is on whether a residual exists yet.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from inference.attention import AttentionMetadata, paged_attention
from inference.parallel import group
from inference.parallel.layers import (
    ColumnParallelLinear, PackableLinear, RowParallelLinear, VocabParallelEmbedding, shard_heads,
)
from kernels import cpu_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm of the last dim; `out=x` normalises in place (the q/k slices of the qkv output)."""
        return kernels.rms_norm(x, self.weight, self.eps, out)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), in one kernel on CUDA."""
        return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)


def rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params:  # transformers 5
        return dict(params)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    scaling["rope_theta"] = config.rope_theta
    return scaling


class RotaryEmbedding(nn.Module):
    """Rotates q and k in place by position; the inverse frequencies come from
    transformers so every rope type it knows (llama3, linear, yarn, ...) is
    computed as it does.

    cos/sin are computed once here for every position up to
    `max_position_embeddings` (the engine caps sequences there) into
    `cos_sin_cache` `[max_positions, head_dim]`, float32: row p is
    `[cos(p * inv_freq), sin(p * inv_freq)] * attention_scaling`, the same
    float ops transformers does per step (it duplicates each half; the
    kernels read one and use it twice).
    """

    def __init__(self, config, head_dim: int) -> None:
        super().__init__()
        params = rope_parameters(config)
        max_positions = getattr(config, "max_position_embeddings", None) or 2048
        with torch.device("cpu"):  # real numbers even when the model is built on meta
            inv_freq, attention_scaling = self._inv_freq(config, params, head_dim)
            freqs = torch.arange(max_positions).float()[:, None] * inv_freq.float()[None, :]
            cache = torch.cat((freqs.cos() * attention_scaling, freqs.sin() * attention_scaling), dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    @staticmethod
    def _inv_freq(config, params: dict, head_dim: int) -> tuple[torch.Tensor, float]:
        if params["rope_type"] == "default":
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
            return 1.0 / (params["rope_theta"] ** exponents), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> None:
        kernels.apply_rotary_embedding(query, key, positions, self.cos_sin_cache)


class Attention(nn.Module):
    def __init__(self, config, head_dim: int, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        num_heads = config.num_attention_heads
        shard = shard_heads(
            num_heads, getattr(config, "num_key_value_heads", None) or num_heads, group.rank(), group.size()
        )
        self.num_heads = shard.num_heads  # this rank's
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        q_start, kv_start = shard.first_head * head_dim, shard.first_kv_head * head_dim
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, [(q_start, self.q_size), (kv_start, self.kv_size), (kv_start, self.kv_size)], qkv_bias
        )
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, q_start)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps) if qk_norm else None
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # bound by the runner

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        # q, k and v stay views of the one qkv output: q/k norm and rotary
        # rewrite them in place rather than allocating copies.
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            self.q_norm(q, out=q)
            self.k_norm(k, out=k)
        rotary(positions, q, k)
        out = paged_attention(q, k, v, self.kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size // group.size()  # this rank's
        start = group.rank() * self.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size, [(start, self.intermediate_size), (start, self.intermediate_size)], bias=False
        )
        self.down_proj = RowParallelLinear(self.intermediate_size, config.hidden_size, start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config, head_dim: int, qkv_bias: bool, qk_norm: bool, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = Attention(config, head_dim, qkv_bias, qk_norm)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp output, residual stream before it); the next norm adds the two.

        `residual` is None for the first layer, whose input is the embedding itself."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add_and_norm(x, residual)
        x = self.self_attn(x, positions, rotary, meta)
        x, residual = self.post_attention_layernorm.add_and_norm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        model_type = config.model_type
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        qkv_bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        qk_norm = model_type in ("qwen3", "qwen3_moe")
        self.config = config
        self.head_dim = head_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, head_dim, qkv_bias, qk_norm, self.make_mlp(config, layer_id))
            for layer_id in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config, head_dim)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = (
            None if self.tie_word_embeddings else VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        )
        self.lm_head_packed: torch.Tensor | None = None  # set by pack_cpu_weights
        self.lm_head_onednn: torch.Tensor | None = None

    def make_mlp(self, config, layer_id: int) -> nn.Module:
        """The feed-forward block of layer `layer_id`: the hook the mixture-of-experts families override."""
        return MLP(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Flattened tokens of the whole batch -> final hidden states."""
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary, meta)
        return self.norm.add_and_norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = cpu_linear.linear(hidden, weight, None, self.lm_head_packed, self.lm_head_onednn)
        return group.gather_vocab(logits, self.config.vocab_size)

    def pack_cpu_weights(self) -> int:
        """Packed copies of every linear weight and the LM head where
        the device and dtype allow (`kernels/cpu_linear.py`); the bytes added."""
        added = sum(m.pack() for m in self.modules() if isinstance(m, PackableLinear))
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.lm_head_packed = cpu_linear.pack_weight(weight)
        self.lm_head_onednn = cpu_linear.pack_onednn(weight)
        for copy in (self.lm_head_packed, self.lm_head_onednn):
            if copy is not None:
                added += weight.numel() * weight.element_size()
        return added
