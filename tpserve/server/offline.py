"""Offline generation: run whole prompts to completion on an engine in this thread (the batch
generator behind launch/generate.py, and what tests and benchmarks drive the engine with)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from tpserve.engine.sampling_params import SamplingParams
from tpserve.errors import InvalidRequest
from tpserve.server.outputs import CompletedRequest, OutputAccumulator
from tpserve.server.requests import RequestFactory

_batches = itertools.count()


def generate(engine, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
             model: str = "target") -> list[CompletedRequest]:
    """Prompts (text or token-id lists) -> their results, in input order. Every request is
    validated before any is queued, so a bad one (InvalidRequest naming the value and the limit)
    runs none. model: "target", "small" or "auto" (tpserve.route). Other requests live on the
    engine keep their place (their outputs are not collected here); when there are none, the
    engine is left with nothing of these requests, worker tables included."""
    results = dict(generate_iter(engine, prompts, params, model))
    return [results[i] for i in range(len(prompts))]


def generate_iter(engine, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                  model: str = "target", skip_invalid: bool = False
                  ) -> Iterator[tuple[int, CompletedRequest | InvalidRequest]]:
    """(index, result) for each prompt as soon as it finishes (finish order). A prompt the request
    factory refuses raises its InvalidRequest before anything runs, or with `skip_invalid` is
    yielded first as (index, the error) while the others run."""
    params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
    factory = RequestFactory.for_engine(engine)
    batch = next(_batches)
    seqs, refused = [], []
    for i, (prompt, p) in enumerate(zip(prompts, params_list)):
        text = prompt if isinstance(prompt, str) else None
        try:
            seqs.append((i, factory.make(f"gen-{batch}-{i}", text, None if text is not None else prompt, p, model)))
        except InvalidRequest as e:
            if not skip_invalid:
                raise
            refused.append((i, e))
    yield from refused
    pending = {}
    for i, seq in seqs:
        engine.add_sequence(seq)
        pending[seq.request_id] = (i, OutputAccumulator(seq.request_id, seq.prompt_token_ids))
    while pending:
        for out in engine.step():
            if out.request_id not in pending:
                continue
            i, acc = pending[out.request_id]
            if acc.add(out).finished:
                del pending[out.request_id]
                yield i, acc.result
    if not engine.request_ids and engine.has_work():
        engine.step()  # no other request is live: drop the finished ones' worker tables now
