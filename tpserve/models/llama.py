"""Llama-family decoder (Llama 2/3, Mistral, Qwen2), tensor-parallel.

Parameter names mirror the HF checkpoint except for the fused `qkv_proj` and `gate_up_proj`;
`STACKED_PARAMS` says which checkpoint tensors fill which fused shard. Per layer there is one
all-reduce after attention (o_proj) and one after the MLP (down_proj).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tpserve.config import ModelConfig
from tpserve.distributed import TPGroup
from tpserve.layers.attention import Attention
from tpserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tpserve.layers.linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tpserve.layers.norm import RMSNorm
from tpserve.layers.rotary import RotaryEmbedding
from tpserve.ops.attention import AttentionMetadata

KVCache = tuple[torch.Tensor, ...]  # (k_cache, v_cache[, k_rows, v_rows])


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup, quant=None) -> None:
        super().__init__()
        dtype = config.dtype
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, config.head_dim, config.num_attention_heads,
            config.num_key_value_heads, config.attention_bias, tp, dtype, quant,
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim, config.hidden_size, False, tp, dtype, quant
        )
        self.attn = Attention(
            self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, config.head_dim, config.sliding_window
        )

    def forward(self, rope, hidden, kv_cache: KVCache, meta: AttentionMetadata):
        """rope: (cos, sin) at this step's positions, from LlamaModel."""
        qkv = self.qkv_proj(hidden)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        heads, kv_heads, head_dim = self.attn.num_heads, self.attn.num_kv_heads, self.attn.head_dim
        # q and k sit side by side in the fused output: rotate both in one pass.
        qk = RotaryEmbedding.rotate(qkv[:, : q_size + kv_size].view(-1, heads + kv_heads, head_dim), rope)
        out = self.attn(qk[:, :heads], qk[:, heads:], qkv[:, q_size + kv_size :], kv_cache, meta)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup, quant=None) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], config.mlp_bias, tp, config.dtype, quant
        )
        self.down_proj = RowParallelLinear(size, config.hidden_size, config.mlp_bias, tp, config.dtype, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup, quant=None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, tp, quant)
        self.mlp = LlamaMLP(config, tp, quant)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)

    def forward(self, rope, hidden, kv_cache: KVCache, meta: AttentionMetadata):
        hidden = hidden + self.self_attn(rope, self.input_layernorm(hidden), kv_cache, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup, quant=None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp, config.dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, tp, quant) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope)  # shared by every layer

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata):
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb.cos_sin(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(rope, hidden, kv_cache, meta)
        return self.norm(hidden)


class LlamaForCausalLM(nn.Module):
    """input_ids, positions [num_tokens] -> final hidden states [num_tokens, hidden_size] on every
    rank; `compute_logits` turns selected rows into [rows, vocab_size] logits on rank 0."""

    # (fused parameter, checkpoint name, shard id)
    STACKED_PARAMS = (
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    )
    # Checkpoint tensors that carry no weights the model needs.
    IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

    def __init__(self, config: ModelConfig, tp: TPGroup, quant=None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = LlamaModel(config, tp, quant)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp, config.dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata):
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head.compute_logits(hidden)

    def checkpoint_names(self) -> dict[str, tuple[str, object]]:
        """Every checkpoint tensor name this model expects -> (target name, shard id).

        A linear layer's tensors depend on its quant method (`weight`, or e.g. GPTQ's `qweight`,
        `qzeros`, `scales`, `g_idx`) plus `bias`; the target is "<module>.<suffix>", which the
        loader hands to the module's `load_checkpoint_tensor`. Other targets are parameters."""
        return self._names(optional=False)

    def optional_checkpoint_names(self) -> dict[str, tuple[str, object]]:
        """Names a checkpoint may hold or omit (e.g. GPTQ's all-zero biases), same mapping."""
        return self._names(optional=True)

    def _names(self, optional: bool) -> dict[str, tuple[str, object]]:
        names: dict[str, tuple[str, object]] = {}
        params = dict(self.named_parameters(remove_duplicate=True))
        for mod_name, module in self.named_modules():
            if isinstance(module, LinearBase):
                suffixes = module.optional_checkpoint_suffixes() if optional else module.checkpoint_suffixes()
                targets = [f"{mod_name}.{s}" for s in suffixes]
            elif optional:
                continue
            else:
                targets = [f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters(recurse=False)]
                targets = [t for t in targets if t in params]  # tied weights appear once
            fused = [s for s in self.STACKED_PARAMS if mod_name.endswith(f".{s[0]}")]
            for target in targets:
                for fused_name, original, shard_id in fused:
                    names[target.replace(f".{fused_name}.", f".{original}.")] = (target, shard_id)
                if not fused:
                    names[target] = (target, None)
        return names

    def ignorable(self, name: str) -> bool:
        if name.endswith(self.IGNORED_SUFFIXES):
            return True
        # Some tied checkpoints still store lm_head.weight; it equals the embedding.
        return self.config.tie_word_embeddings and name == "lm_head.weight"
