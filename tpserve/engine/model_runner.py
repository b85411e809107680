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
from tpserve.ops import dispatch
from tpserve.ops.attention import AttentionMetadata
from tpserve.ops.kv_rows import KVRows
from tpserve.quant.methods import quant_method_for
from tpserve.weights import load_weights

logger = logging.getLogger(__name__)

DEFAULT_CPU_CACHE_BYTES = 512 * 2**20
MIN_ROWS_BUDGET_BYTES = 256 * 2**20


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
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
    ) -> None:
        self.model_config = model_config
        self.cache_config = cache_config
        self.tp = tp
        self.device = tp.device
        dispatch.require_kernels(self.device)
        self.model = build_model(model_config, tp, quant_method_for(model_config))
        load_weights(self.model, model_dir, show_progress=show_progress and tp.is_first)
        self.block_size = cache_config.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_tables: dict[int, list[int]] = {}
        self.rows: KVRows | None = None
        self.num_blocks = self._decide_num_blocks()
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        self.rows = self._make_rows(max_num_seqs)
        if tp.is_first:
            logger.info(
                "KV cache: %d blocks x %d tokens = %d tokens per rank (%.1f MiB per rank)",
                self.num_blocks, self.block_size, self.num_tokens_capacity,
                self.num_blocks * self.cache_block_bytes / 2**20,
            )

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

    @property
    def num_tokens_capacity(self) -> int:
        return self.num_blocks * self.block_size

    def _cuda_cache_budget(self) -> int:
        """GPU bytes left for the KV cache: the utilisation target minus the weights and the peak
        activation memory of a profiling forward at the full per-step token budget."""
        from tpserve.engine.step import SeqWork, StepPlan

        num_tokens = min(self.max_num_batched_tokens, self.model_config.max_position_embeddings)
        num_profile_blocks = -(-num_tokens // self.block_size)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.kv_caches = self._allocate_kv_cache(num_profile_blocks)
        profile_cache_bytes = num_profile_blocks * self.cache_block_bytes
        plan = StepPlan([SeqWork(-1, [0] * num_tokens, 0, block_table=list(range(num_profile_blocks)))])
        self.execute(plan)
        self.block_tables.pop(-1, None)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - profile_cache_bytes
        self.kv_caches = []
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info(self.device)
        return max(0, int(total * self.cache_config.gpu_memory_utilization) - peak)

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        attn = self.model.model.layers[0].self_attn.attn
        shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
        dtype = self.model_config.dtype
        # Nothing reads a slot before it is written (the attention paths mask or redirect unwritten
        # positions), so host memory is left unset: no 512 MiB memset at start, and pages are
        # only touched as blocks fill. GPU memory is cleared (cheap there).
        alloc = torch.zeros if self.device.type == "cuda" else torch.empty
        caches = []
        for _ in range(self.model_config.num_hidden_layers):
            k = alloc(shape, dtype=dtype, device=self.device)
            v = alloc(shape, dtype=dtype, device=self.device)
            caches.append((k, v))
        return caches

    def _make_rows(self, max_num_seqs: int) -> KVRows | None:
        """Contiguous K/V rows for the CPU attention path (tpserve.ops.kv_rows); None where the
        Triton kernels read the blocks themselves, or when turned off."""
        if not self.cache_config.contiguous_rows or dispatch.uses_triton(self.device):
            return None
        attn = self.model.model.layers[0].self_attn.attn
        # Rows pad every sequence to the longest, so they may take twice the paged cache (at least
        # MIN_ROWS_BUDGET_BYTES); a step needing more attends the blocks.
        budget = max(2 * self.num_blocks * self.cache_block_bytes, MIN_ROWS_BUDGET_BYTES)
        return KVRows(self.model_config.num_hidden_layers, attn.num_kv_heads, attn.head_dim, max_num_seqs,
                      self.model_config.max_position_embeddings, self.model_config.dtype, self.device,
                      budget_bytes=budget)

    # --- inputs -------------------------------------------------------------------------------
    def forget_block_tables(self) -> None:
        """Drop every block table (a runner whose plans always carry full tables: the draft's)."""
        self.block_tables.clear()

    def apply_block_diffs(self, plan: StepPlan) -> None:
        """Bring this rank's copy of every block table up to date with rank 0's."""
        for seq_id in plan.finished:
            self.block_tables.pop(seq_id, None)
            if self.rows is not None:  # its row may not outlive its blocks (plans without sequences too)
                self.rows.release(seq_id)
        for seq in plan.seqs:
            if seq.block_table is not None:
                self.block_tables[seq.seq_id] = list(seq.block_table)
                continue
            table = self.block_tables[seq.seq_id]
            if seq.num_blocks_kept is not None:
                del table[seq.num_blocks_kept :]
            table.extend(seq.new_blocks)

    def prepare(self, plan: StepPlan):
        """Returns (input_ids [T], positions [T], AttentionMetadata, logits_indices [L])."""
        self.apply_block_diffs(plan)
        bs = self.block_size
        input_ids, positions, slots, query_start, seq_lens, logits_idx = [], [], [], [0], [], []
        tables = [self.block_tables[seq.seq_id] for seq in plan.seqs]
        for seq, table in zip(plan.seqs, tables):
            start = seq.num_computed_tokens
            end = start + len(seq.token_ids)
            if end > len(table) * bs:
                raise ValueError(
                    f"sequence {seq.seq_id}: {end} tokens need {-(-end // bs)} blocks, "
                    f"block table has {len(table)}"
                )
            input_ids.extend(seq.token_ids)
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(len(input_ids))
            seq_lens.append(end)
            if seq.sample:
                logits_idx.extend(range(len(input_ids) - seq.num_logits, len(input_ids)))
        rows = None
        if self.rows is not None:  # attention reads the rows: no block table tensor to build
            rows = self.rows.prepare([s.seq_id for s in plan.seqs], [s.num_computed_tokens for s in plan.seqs],
                                     [len(s.token_ids) for s in plan.seqs], tables, bs, self.kv_caches)
            if rows is None and self.rows.over_budget_steps == 1 and self.tp.is_first:
                logger.warning("contiguous K/V rows: a step needs more than their budget (%.1f MiB: twice the "
                               "KV cache, at least 256 MiB); such steps gather the KV blocks instead",
                               self.rows.budget_bytes / 2**20)
        if rows is not None:
            table_tensor = torch.zeros(len(tables), 0, dtype=torch.int32)
        else:
            max_blocks = max(len(t) for t in tables)
            table_tensor = torch.zeros(len(tables), max_blocks, dtype=torch.int32)
            for i, table in enumerate(tables):
                table_tensor[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=table_tensor.to(dev),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
            max_query_len=max(b - a for a, b in zip(query_start, query_start[1:])),
            max_seq_len=max(seq_lens),
            rows=rows,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos, meta, torch.tensor(logits_idx, dtype=torch.int64, device=dev)

    # --- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run one step. Returns float32 logits [num_logit_rows, vocab_size] on rank 0 (rows in
        plan order), None on other ranks and for a plan with no sequences."""
        if not plan.seqs:
            self.apply_block_diffs(plan)
            return None
        ids, pos, meta, logits_idx = self.prepare(plan)
        caches = self.kv_caches if meta.rows is None else [
            (k, v, *self.rows.layer(i)) for i, (k, v) in enumerate(self.kv_caches)]
        hidden = self.model(ids, pos, caches, meta)
        logits = self.model.compute_logits(hidden[logits_idx])
        return None if logits is None else logits.float()
