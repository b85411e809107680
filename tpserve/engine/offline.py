"""Offline batch generation on rank 0 over the paged KV cache.

Sequences are admitted while their whole budget (prompt + max_tokens) of KV blocks is free, prefilled
together in one packed step, then decoded together; finished sequences return their blocks at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tpserve.engine.worker import Driver


@dataclass
class GenerationRequest:
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class OfflineGenerator:
    def __init__(self, driver: Driver, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.driver = driver
        runner = driver.runner
        self.block_size = runner.block_size
        self.num_blocks = runner.num_blocks
        self.max_model_len = runner.model_config.max_position_embeddings
        self.eos_token_ids = set(eos_token_ids)

    def _blocks_needed(self, req: GenerationRequest) -> int:
        return -(-(len(req.prompt_token_ids) + req.max_tokens) // self.block_size)

    def validate(self, req: GenerationRequest) -> None:
        if not req.prompt_token_ids:
            raise ValueError("prompt is empty")
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens={req.max_tokens} must be >= 1")
        total = len(req.prompt_token_ids) + req.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt length {len(req.prompt_token_ids)} + max_tokens {req.max_tokens} = {total} "
                f"exceeds the model's max length {self.max_model_len}"
            )
        if self._blocks_needed(req) > self.num_blocks:
            raise ValueError(
                f"request needs {self._blocks_needed(req)} KV blocks but the cache has {self.num_blocks}"
            )

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        for req in requests:
            self.validate(req)
        results = [GenerationResult(list(r.prompt_token_ids)) for r in requests]
        pending = list(range(len(requests)))
        free = list(range(self.num_blocks))
        while pending:
            batch, tables = [], {}
            while pending and self._blocks_needed(requests[pending[0]]) <= len(free):
                i = pending.pop(0)
                n = self._blocks_needed(requests[i])
                tables[i], free = free[:n], free[n:]
                batch.append(i)
            self._run_batch(batch, requests, results, tables)
            for i in batch:
                free.extend(tables[i])
        return results

    def _run_batch(self, batch, requests, results, tables) -> None:
        from tpserve.engine.step import SeqWork, StepPlan

        gens = {i: torch.Generator().manual_seed(requests[i].seed) for i in batch if requests[i].seed is not None}
        work = {i: SeqWork(i, list(requests[i].prompt_token_ids), 0, tables[i]) for i in batch}
        running = list(batch)
        while running:
            logits = self.driver.step(StepPlan([work[i] for i in running]))
            still = []
            for row, i in enumerate(running):
                token = self._sample(logits[row], requests[i], gens.get(i))
                res = results[i]
                res.token_ids.append(token)
                w = work[i]
                w.num_computed_tokens += len(w.token_ids)
                w.token_ids = [token]
                if token in self.eos_token_ids:
                    res.finish_reason = "stop"
                elif len(res.token_ids) >= requests[i].max_tokens:
                    res.finish_reason = "length"
                else:
                    still.append(i)
            running = still

    @staticmethod
    def _sample(logits: torch.Tensor, req: GenerationRequest, gen) -> int:
        if req.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / req.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen))
