"""One rank's forward pass: builds input tensors from a `StepPlan` and runs the model over its
own slice of the paged KV cache."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tpserve.config import CacheConfig, ConfigError, ModelConfig
from tpserve.distributed import TPGroup
from tpserve.engine.step import StepPlan
from tpserve.models import build_model
from tpserve.ops.attention import AttentionMetadata
from tpserve.weights import load_weights

logger = logging.getLogger(__name__)

DEFAULT_CPU_CACHE_BYTES = 512 * 2**20


class ModelRunner:
    """Holds this rank's model shard and KV cache.

    kv_caches[layer] = (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads_per_rank,
    head_dim]. `num_blocks` is the same on every rank (rank 0's scheduler plans with it).
    """

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        tp: TPGroup,
        model_dir: str | Path,
        show_progress: bool = True,
    ) -> None:
        self.model_config = model_config
        self.cache_config = cache_config
        self.tp = tp
        self.device = tp.device
        self.model = build_model(model_config, tp)
        load_weights(self.model, model_dir, show_progress=show_progress and tp.is_first)
        self.block_size = cache_config.block_size
        self.num_blocks = self._decide_num_blocks()
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)

    # --- KV cache -----------------------------------------------------------------------------
    @property
    def cache_block_bytes(self) -> int:
        """Bytes one KV block takes on this rank, over all layers, K and V."""
        attn = self.model.model.layers[0].self_attn.attn
        elem = torch.tensor([], dtype=self.model_config.dtype).element_size()
        per_layer = 2 * self.block_size * attn.num_kv_heads * attn.head_dim * elem
        return per_layer * self.model_config.num_hidden_layers

    def _decide_num_blocks(self) -> int:
        cfg = self.cache_config
        if cfg.num_blocks is not None:
            num_blocks = cfg.num_blocks
        else:
            budget = cfg.cache_memory_bytes
            if budget is None:
                budget = self._cuda_cache_budget() if self.device.type == "cuda" else DEFAULT_CPU_CACHE_BYTES
            num_blocks = budget // self.cache_block_bytes
            if num_blocks < 1:
                raise ConfigError(
                    f"KV cache budget of {budget} bytes is smaller than one block "
                    f"({self.cache_block_bytes} bytes at block_size={self.block_size})"
                )
        # Every rank must plan with the same count: take the minimum over the group.
        if self.tp.tp_size > 1:
            t = torch.tensor([num_blocks], dtype=torch.int64)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.tp.cpu_group)
            num_blocks = int(t.item())
        return num_blocks

    def _cuda_cache_budget(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        reserve = int(total * (1.0 - self.cache_config.gpu_memory_utilization))
        return max(0, free - reserve)

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        attn = self.model.model.layers[0].self_attn.attn
        shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
        dtype = self.model_config.dtype
        caches = []
        for _ in range(self.model_config.num_hidden_layers):
            k = torch.zeros(shape, dtype=dtype, device=self.device)
            v = torch.zeros(shape, dtype=dtype, device=self.device)
            caches.append((k, v))
        return caches

    # --- inputs -------------------------------------------------------------------------------
    def prepare(self, plan: StepPlan):
        """Returns (input_ids [T], positions [T], AttentionMetadata, sample_indices [S])."""
        bs = self.block_size
        input_ids, positions, slots, query_start, seq_lens, sample_idx = [], [], [], [0], [], []
        max_blocks = 1
        for seq in plan.seqs:
            start = seq.num_computed_tokens
            end = start + len(seq.token_ids)
            if end > len(seq.block_table) * bs:
                raise ValueError(
                    f"sequence {seq.seq_id}: {end} tokens need {-(-end // bs)} blocks, "
                    f"block table has {len(seq.block_table)}"
                )
            input_ids.extend(seq.token_ids)
            positions.extend(range(start, end))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(len(input_ids))
            seq_lens.append(end)
            max_blocks = max(max_blocks, len(seq.block_table))
            if seq.sample:
                sample_idx.append(len(input_ids) - 1)
        tables = torch.zeros(len(plan.seqs), max_blocks, dtype=torch.int32)
        for i, seq in enumerate(plan.seqs):
            tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
            max_query_len=max(b - a for a, b in zip(query_start, query_start[1:])),
            max_seq_len=max(seq_lens),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos, meta, torch.tensor(sample_idx, dtype=torch.int64, device=dev)

    # --- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run one step. Returns float32 logits [num_sampled_seqs, vocab_size] on rank 0, else None."""
        ids, pos, meta, sample_idx = self.prepare(plan)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        logits = self.model.compute_logits(hidden[sample_idx])
        return None if logits is None else logits.float()
