"""Offline generation: run whole prompts to completion on an engine in this thread (the batch
generator behind launch/generate.py, and what tests and benchmarks drive the engine with)."""

from __future__ import annotations

import itertools

from tpserve.engine.sampling_params import SamplingParams
from tpserve.server.outputs import CompletedRequest, OutputAccumulator
from tpserve.server.requests import RequestFactory

_batches = itertools.count()


def generate(engine, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
             model: str = "target") -> list[CompletedRequest]:
    """Prompts (text or token-id lists) -> their results, in input order. Every request is
    validated before any is queued, so a bad one (InvalidRequest naming the value and the limit)
    runs none. model: "target", "small" or "auto" (tpserve.route). Other requests live on the engine keep their place (their outputs are not collected
here); when there are none, the engine is left with nothing of these requests, worker tables
included."""
    params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
    factory = RequestFactory.for_engine(engine)
    batch = next(_batches)
    seqs = []
    for i, (prompt, p) in enumerate(zip(prompts, params_list)):
        text = prompt if isinstance(prompt, str) else None
        seqs.append(factory.make(f"gen-{batch}-{i}", text, None if text is not None else prompt, p, model))
    results = {}
    for seq in seqs:
        engine.add_sequence(seq)
        results[seq.request_id] = OutputAccumulator(seq.request_id, seq.prompt_token_ids)
    while any(not acc.result.finished for acc in results.values()):
        for out in engine.step():
            if out.request_id in results:
                results[out.request_id].add(out)
    if not engine.request_ids and engine.has_work():
        engine.step()  # no other request is live: drop the finished ones' worker tables now
    return [acc.result for acc in results.values()]
