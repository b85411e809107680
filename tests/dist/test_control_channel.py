"""The control channel between real gloo ranks: rank 0's typed messages arrive whole, and a worker
that receives a malformed or hostile message (a pickle that would run code, an absurd length)
fails with an error naming it instead of executing or allocating anything."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

from tests.dist_harness import run_ranks


class _Boom:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


def _rank(marker: str, report: str, hostile: str):
    from tpserve.distributed import init_distributed
    from tpserve.engine.step import SeqWork, StepPlan, encode
    from tpserve.engine.worker import run_worker

    tp = init_distributed(device_type="cpu")
    if tp.is_first:
        plan = StepPlan([SeqWork(3, [5, 6, 7], 0, block_table=[0, 1])], finished=[2])
        tp.broadcast_bytes(encode(plan))  # a well-formed message first: the worker decodes it
        if hostile == "pickle":
            data = pickle.dumps(_Boom(marker))
            tp.broadcast_bytes(data + b"\x00" * (-len(data) % 8))
        else:  # announce 2**40 bytes and send nothing
            import torch
            import torch.distributed as dist

            dist.broadcast(torch.tensor([2**40], dtype=torch.int64), src=0, group=tp.cpu_group)
        return "sent"
    seen = []
    runner = SimpleNamespace(tp=tp, execute=lambda plan: seen.append(plan))
    try:
        run_worker(runner)
    except ValueError as e:  # ControlMessageError is one
        Path(report).write_text(f"{type(e).__name__}: {e}\nseen {seen}")
    return None


def test_hostile_control_messages_fail_the_worker_without_running_anything(tmp_path):
    for hostile in ("pickle", "length"):
        marker, report = tmp_path / f"{hostile}.ran", tmp_path / f"{hostile}.report"
        assert run_ranks(2, _rank, str(marker), str(report), hostile, timeout=120) == "sent"
        text = report.read_text()
        assert "seen [StepPlan(seqs=[SeqWork(seq_id=3, token_ids=[5, 6, 7]" in text
        if hostile == "pickle":
            assert text.startswith("ControlMessageError: not a tpserve control message (wrong magic number)")
        else:
            assert "rank 0 announced a control message of 1099511627776 bytes; the limit is" in text
        assert not marker.exists(), "the pickle ran"
