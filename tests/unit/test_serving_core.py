"""The protocol-neutral serving core without a protocol: the request factory's validation, the
output accumulator, and ServingCore over a real EngineLoop (in a thread, as the main thread runs
it in a server) on a fake model: outputs, typed errors, cancellation, group failure; and a front
end hosting several listeners on one event loop."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest

from tests.fake_engine import VOCAB, fake_engine, greedy_reference
from tests.unit.test_detokenizer import TOK
from tpserve.engine.sampling_params import SamplingError, SamplingParams
from tpserve.engine.scheduler import RequestRejected
from tpserve.errors import InvalidRequest, Overloaded, Unavailable, Unsupported
from tpserve.server.app import FrontEnd
from tpserve.server.core import ServingCore
from tpserve.server.engine_loop import EngineLoop
from tpserve.server.offline import generate
from tpserve.server.outputs import OutputAccumulator
from tpserve.server.requests import RequestFactory, RequestLimits
from tpserve.server.state import DRAINING, LOADING, SERVING, ModelInfo, ServerState

GREEDY = dict(temperature=0.0, ignore_eos=True)
LIMITS = RequestLimits(vocab_size=VOCAB, max_model_len=64, num_kv_blocks=8, block_size=4)


@pytest.mark.parametrize("prompt,ids,params,error,message", [
    ("", None, None, RequestRejected, "prompt is empty"),
    (None, [], None, RequestRejected, "prompt is empty"),
    (None, [1, VOCAB], None, RequestRejected, f"token id {VOCAB} is outside the vocabulary [0, {VOCAB})"),
    (None, None, None, RequestRejected, "give exactly one of a text prompt and prompt token ids"),
    ("hi", None, None, RequestRejected, "text prompt given but the model has no tokenizer"),
    (None, [1] * 10, dict(max_tokens=60), RequestRejected, "10 + max_tokens 60 = 70 exceeds the max model length 64"),
    (None, [1] * 10, dict(max_tokens=30), RequestRejected, "needs 10 KV blocks of 4 tokens, but the cache has 8"),
    (None, [1], dict(top_k=VOCAB + 1), SamplingError, f"top_k={VOCAB + 1} exceeds the vocabulary size {VOCAB}"),
    (None, [1], dict(stop=["x"]), SamplingError, "stop strings need a tokenizer"),
])
def test_factory_rejects_with_the_value_and_the_limit(prompt, ids, params, error, message):
    with pytest.raises(error, match=re.escape(message)) as e:
        RequestFactory(LIMITS).make("r", prompt, ids, SamplingParams(**(params or {})))
    assert isinstance(e.value, InvalidRequest) and e.value.kind == "invalid_argument"


def test_factory_makes_a_sequence_with_its_detokenizer():
    seq = RequestFactory(LIMITS, TOK).make("r", "ab", None, SamplingParams(stop=["zz"]))
    assert seq.prompt_token_ids == TOK.encode("ab") and seq.seq_id == -1
    assert seq.detokenizer is not None and seq.detokenizer.stop == ["zz"]
    assert seq.times.arrival <= time.monotonic()


def test_accumulated_deltas_equal_offline_results():
    prompts = [[5, 6, 7], [9] * 13]
    whole = generate(fake_engine(), prompts, SamplingParams(max_tokens=9, logprobs=2, **GREEDY))
    engine = fake_engine()
    factory = RequestFactory.for_engine(engine)
    accs = {}
    for i, p in enumerate(prompts):
        engine.add_sequence(factory.make(f"x{i}", prompt_token_ids=p, params=SamplingParams(max_tokens=9, logprobs=2,
                                                                                             **GREEDY)))
        accs[f"x{i}"] = OutputAccumulator(f"x{i}", p)
    while engine.has_work():
        for out in engine.step():
            accs[out.request_id].add(out)
    for acc, want, prompt in zip(accs.values(), whole, prompts):
        got = acc.result
        assert got.finished and got.token_ids == want.token_ids == greedy_reference(prompt, 9)
        assert [lp.token_id for lp in got.logprobs] == got.token_ids and len(got.logprobs[0].top) == 2
        assert got.finish_reason == "length" and got.prompt_token_ids == prompt


class Served:
    """A ServingCore over an EngineLoop that runs in its own thread."""

    def __init__(self, max_queued_requests=64, fail_at_step=None, **engine_kwargs) -> None:
        self.engine = fake_engine(fail_at_step=fail_at_step, **engine_kwargs)
        self.door = EngineLoop(self.engine, max_queued_requests, heartbeat_s=0.05)
        self.state = ServerState("fake")
        self.core = ServingCore(self.state)
        self.code = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = self.door.run()

    def start(self) -> Served:
        info = ModelInfo("fake", "Fake", 256, VOCAB, 1, "none", "float32", False)
        self.state.attach(self.engine, self.door, info)
        self.state.phase = SERVING
        self._thread.start()
        return self

    def stop(self) -> int:
        self.door.begin_drain(0.0)
        self._thread.join(10)
        return self.code

    def collect(self, request_id, prompt, **params):
        async def go():
            return [out async for out in self.core.generate(request_id, None, prompt, SamplingParams(**params))]

        return asyncio.run(go())


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_core_streams_outputs_to_the_finish():
    served = Served().start()
    try:
        outs = served.collect("a", [4, 5, 6], max_tokens=12, **GREEDY)
        assert [o.finished for o in outs][-1] and not any(o.finished for o in outs[:-1])
        assert [t for o in outs for t in o.new_token_ids] == greedy_reference([4, 5, 6], 12)
        assert outs[-1].times is not None and outs[-1].num_output_tokens == 12
        wait_until(lambda: served.door.stats.kv_blocks_in_use == 0)
        assert served.core.server_info().num_finished_requests == 1
    finally:
        assert served.stop() == 0
    assert served.engine.leftovers() == {} and served.engine.driver.shut_down


def test_core_errors_are_typed():
    served = Served(max_queued_requests=1, max_num_seqs=1, step_seconds=0.02).start()
    try:
        with pytest.raises(InvalidRequest, match="prompt is empty"):
            served.collect("a", [], max_tokens=2)
        with pytest.raises(Unsupported, match="no tokenizer"):
            served.core.tokenize("x")
        assert served.core.model_info().served_model_name == "fake"

        async def queue_behind_a_long_request():
            first = served.core.generate("long", None, [4, 5], SamplingParams(max_tokens=200, **GREEDY))
            await first.__anext__()  # it runs, alone (max_num_seqs=1): the others must wait
            results = []
            for i in range(3):
                gen = served.core.generate(f"q{i}", None, [4, 5], SamplingParams(max_tokens=2))
                task = asyncio.ensure_future(gen.__anext__())
                await asyncio.sleep(0.1)  # several engine steps: the first one is waiting by now
                results.append(task.exception() if task.done() else task)
            await first.aclose()
            return results

        results = asyncio.run(queue_behind_a_long_request())
        assert [type(r).__name__ for r in results] == ["Task", "Overloaded", "Overloaded"], results
        assert "2 requests" not in str(results[1]) and "--max-queued-requests=1" in str(results[1])
        assert results[1].kind == "resource_exhausted"
        served.door.begin_drain(5.0)
        with pytest.raises(Unavailable, match="draining"):
            served.collect("late", [4], max_tokens=1)
    finally:
        served.stop()


def test_unavailable_while_loading():
    state = ServerState("fake")
    core = ServingCore(state)
    assert state.phase == LOADING and not core.ready()
    with pytest.raises(Unavailable, match="still loading"):
        core.model_info()

    async def go():
        return [o async for o in core.generate("a", None, [1])]

    with pytest.raises(Unavailable, match="still loading"):
        asyncio.run(go())


def test_cancelling_a_stream_aborts_the_request_and_frees_its_blocks():
    served = Served().start()
    try:
        async def go():
            gen = served.core.generate("c", None, [4, 5, 6], SamplingParams(max_tokens=200, **GREEDY))
            await gen.__anext__()
            await gen.__anext__()
            assert served.door.stats.kv_blocks_in_use > 0
            await gen.aclose()  # what a client cancel or a deadline does to the adapter's iteration

        asyncio.run(go())
        wait_until(lambda: served.door.stats.kv_blocks_in_use == 0 and served.door.stats.num_running == 0)
    finally:
        served.stop()
    assert served.engine.leftovers() == {}


def test_a_failed_group_ends_open_streams_with_unavailable():
    served = Served(fail_at_step=6).start()
    with pytest.raises(Unavailable, match="the server failed: RuntimeError: a rank failed"):
        served.collect("f", [4, 5], max_tokens=100, **GREEDY)
    served._thread.join(10)
    assert served.code == 1
    assert not served.core.ready() and "has failed" in served.state.unavailable_reason()


class RecordingListener:
    def __init__(self, port):
        self.port = port
        self.calls = []

    async def start(self):
        self.calls.append(("start", threading.get_ident()))
        return self.port

    async def set_phase(self, phase):
        self.calls.append((phase, threading.get_ident()))

    async def stop(self, grace_s):
        self.calls.append(("stop", threading.get_ident()))


def test_front_end_hosts_several_listeners_on_one_event_loop():
    listeners = [RecordingListener(1), RecordingListener(2)]
    front = FrontEnd(ServerState("x"), listeners)
    assert front.start() == [1, 2]
    front.set_phase(SERVING)
    front.set_phase(DRAINING)
    front.stop(grace_s=0.1)
    threads = {ident for listener in listeners for _, ident in listener.calls}
    assert len(threads) == 1 and threads != {threading.get_ident()}
    assert [c for c, _ in listeners[0].calls] == [c for c, _ in listeners[1].calls] == ["start", SERVING, DRAINING,
                                                                                         "stop"]
    assert front.state.phase == DRAINING


def test_queue_limit_counts_a_request_from_submission_until_the_stats_show_it():
    """The door counts a submitted request as pending until the published stats count it, so the
    limit also holds between the engine adding a request and the next snapshot (a whole step)."""
    from tpserve.server.engine_loop import RequestHandle

    engine = fake_engine(max_num_seqs=1)
    door = EngineLoop(engine, max_queued_requests=2)
    factory = RequestFactory.for_engine(engine)
    loop = asyncio.new_event_loop()
    submit = lambda rid: door.submit(factory.make(rid, prompt_token_ids=[4, 5]), RequestHandle(loop))  # noqa: E731
    submit("a")
    submit("b")
    door._apply_commands(block=False)  # the engine has both; the snapshot does not show them yet
    assert len(engine.scheduler.waiting) == 2 and door.stats.num_waiting == 0
    with pytest.raises(Overloaded, match="2 requests are waiting"):
        submit("c")
    door._publish_stats()
    assert door.stats.num_waiting == 2
    with pytest.raises(Overloaded, match="2 requests are waiting"):
        submit("c")
    engine.step()  # "a" is admitted: one waiting
    door._publish_stats()
    submit("c")
    loop.close()


def test_a_request_caught_by_the_end_of_a_drain_gets_unavailable():
    """A request that passed the draining check just before the drain began and reaches the door
    only after the loop's last look at its queue must not wait forever."""
    from tpserve.server.engine_loop import RequestHandle

    engine = fake_engine()
    door = EngineLoop(engine, max_queued_requests=4)
    loop = asyncio.new_event_loop()
    late = RequestHandle(loop)
    door._handles["late"] = late  # registered, its add not yet applied (the race window)
    door.begin_drain(0.0)
    assert door.run() == 0
    loop.run_until_complete(asyncio.sleep(0))
    error = late.queue.get_nowait()
    assert isinstance(error, Unavailable) and "drained" in str(error)
    assert engine.driver.shut_down
    loop.close()


def test_http_connections_have_tcp_nodelay():
    """Responses are written as headers, then body: without TCP_NODELAY on the accepted socket the
    body waits for the client's delayed ACK (40 ms on Linux)."""
    import socket

    from tpserve.server.http import HttpListener

    served = Served().start()
    listener = HttpListener(served.core, "127.0.0.1", 0)
    front = FrontEnd(served.state, [listener])
    try:
        (port,) = front.start()
        accepted = []

        async def peek():  # the transports uvicorn's connections run on
            for server in listener.server.servers:
                for sock in server.sockets:
                    accepted.append(sock.proto)

        front._call(peek())
        assert accepted and all(proto == socket.IPPROTO_TCP for proto in accepted)
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(1024).startswith(b"HTTP/1.1 ")
    finally:
        front.stop(grace_s=0.1)
        served.stop()
