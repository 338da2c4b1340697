"""Mixture-of-experts families: Qwen3-MoE and Mixtral.

They are the Llama decoder (attention, norms, residual stream, rotary: all
from `llama.py`) with the dense MLP replaced, in some or all layers, by a
sparse MoE block: a router picks each token's top-k experts from a softmax
over `num_experts` logits, and the token's output is the routing-weighted sum
of those experts' SiLU-gated MLPs (`kernels.fused_moe`).

Per family, as transformers does it:
- Qwen3-MoE: q/k norm (as Qwen3); `norm_topk_prob` renormalises the top-k
  probabilities to sum to 1; the weights are rounded to the activation dtype.
  A layer is sparse unless it is in `mlp_only_layers` or `(layer_id + 1) %
  decoder_sparse_step != 0` (or `num_experts == 0`); the others keep a dense
  MLP of `intermediate_size`. Experts are `moe_intermediate_size` wide.
- Mixtral: always renormalised, weights kept in float32; every layer sparse;
  experts are `intermediate_size` wide.

Expert weights are stacked: `experts.gate_up_proj` `[num_experts, 2 *
moe_intermediate, hidden]` (gate rows, then up rows) and `experts.down_proj`
`[num_experts, hidden, moe_intermediate]`, the names and layout of
transformers' modules; the loader stacks a checkpoint's per-expert tensors
into them. Routing runs on the device with no host sync (CUDA-graph safe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels
from inference.models.llama import MLP, LlamaForCausalLM


@dataclass(slots=True)
class RouterSpec:
    num_experts: int
    top_k: int
    renormalize: bool
    float32_weights: bool  # False: weights rounded to the activation dtype, as Qwen3-MoE does


def route(router_logits: torch.Tensor, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights, topk_ids) `[num_tokens, top_k]`: softmax in float32, top-k, optional renormalisation."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, spec.top_k, dim=-1)
    if spec.renormalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    return (weights if spec.float32_weights else weights.to(router_logits.dtype)), ids


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return kernels.fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, spec: RouterSpec) -> None:
        super().__init__()
        self.spec = spec
        self.gate = nn.Linear(hidden_size, spec.num_experts, bias=False)
        self.experts = Experts(spec.num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = route(self.gate(x), self.spec)
        return self.experts(x, topk_weights, topk_ids)


class MoeForCausalLM(LlamaForCausalLM):
    """Qwen3-MoE and Mixtral: the Llama model with `make_mlp` choosing sparse blocks."""

    def make_mlp(self, config, layer_id: int) -> nn.Module:
        if config.model_type == "mixtral":
            spec = RouterSpec(config.num_local_experts, config.num_experts_per_tok, True, True)
            return SparseMoeBlock(config.hidden_size, config.intermediate_size, spec)
        num_experts = config.num_experts
        sparse = (
            layer_id not in (config.mlp_only_layers or [])
            and num_experts > 0
            and (layer_id + 1) % config.decoder_sparse_step == 0
        )
        if not sparse:
            return MLP(config)
        spec = RouterSpec(num_experts, config.num_experts_per_tok, bool(config.norm_topk_prob), False)
        return SparseMoeBlock(config.hidden_size, config.moe_intermediate_size, spec)
