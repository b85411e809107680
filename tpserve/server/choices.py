"""Several choices of one request: each prompt of a batch, sampled n times.

Prompt i's sample j is choice i * n + j. The first sample of every prompt is submitted at once,
which validates the whole request before a protocol answers anything; the other samples of a
prompt are submitted once its first sample has produced output, so they find the prompt's full
KV blocks in the prefix cache instead of computing them again. Sample j runs with seed + j (a
seeded request stays reproducible and its samples differ) and, when the prompt is being scored,
without scoring it again: its choice reuses the first sample's prompt logprobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

from tpserve.engine.outputs import RequestOutput
from tpserve.engine.sampling_params import SamplingParams
from tpserve.errors import RequestError


def sample_params(params: SamplingParams, j: int) -> SamplingParams:
    if j == 0:
        return params
    seed = None if params.seed is None else params.seed + j
    if params.max_tokens == 0:  # scoring only: every sample scores (there is nothing else to do)
        return replace(params, seed=seed)
    return replace(params, seed=seed, prompt_logprobs=None)


class ChoiceSet:
    def __init__(self, core, request_id: str, prompts: list[tuple[str | None, list[int] | None]],
                 params: SamplingParams, n: int, model: str = "target") -> None:
        """Submits the first sample of every prompt now; raises its RequestError (aborting what
        was already submitted) if one is refused. model: TARGET, SMALL or AUTO (each sample of
        an `auto` request is routed on its own)."""
        self.core = core
        self.model = model
        self.request_id = request_id
        self.prompts = prompts
        self.params = params
        self.n = n
        self.firsts = []
        try:
            for i, (text, ids) in enumerate(prompts):
                self.firsts.append(core.submit(f"{request_id}-{i}-0", text, ids, params, model=model))
        except RequestError:
            for sub in self.firsts:
                sub.abort()
            raise

    @property
    def prompt_token_ids(self) -> list[list[int]]:
        return [sub.prompt_token_ids for sub in self.firsts]

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) in arrival order until every choice has finished. Stopping early
        aborts every choice still running."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks: list[asyncio.Task] = []

        async def drain(index: int, outputs) -> None:
            try:
                async for out in outputs:
                    await queue.put((index, out))
            except RequestError as e:
                await queue.put((index, e))

        siblings = []

        async def run_prompt(i: int, first) -> None:
            outputs = first.outputs()
            try:
                await queue.put((i * self.n, await outputs.__anext__()))
                text, ids = self.prompts[i]
                for j in range(1, self.n):
                    # Part of a request already admitted: no queue limit or admission check again.
                    sub = self.core.submit(f"{self.request_id}-{i}-{j}", text, ids, sample_params(self.params, j),
                                           admitted=True, model=self.model)
                    siblings.append(sub)
                    tasks.append(asyncio.ensure_future(drain(i * self.n + j, sub.outputs())))
            except StopAsyncIteration:
                return
            except RequestError as e:
                await queue.put((i * self.n, e))
                return
            await drain(i * self.n, outputs)

        tasks += [asyncio.ensure_future(run_prompt(i, first)) for i, first in enumerate(self.firsts)]
        remaining = len(self.firsts) * self.n
        try:
            while remaining:
                index, item = await queue.get()
                if isinstance(item, RequestError):
                    raise item
                remaining -= item.finished
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            for sub in [*self.firsts, *siblings]:  # a task cancelled before it ran never aborts its own
                sub.abort()
