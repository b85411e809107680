"""Run a function on N gloo ranks (spawned processes, as torchrun would start them) and collect
rank 0's return value."""

from __future__ import annotations

import io
import os
import traceback

import torch
import torch.multiprocessing as mp

from tpserve.distributed import TPGroup
from tpserve.profile.server import free_port


def _entry(rank, world_size, port, fn, args, queue):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        if rank == 0:
            # Serialised to bytes: tensors sent through a torch queue live in shared memory that
            # disappears when this process exits.
            buf = io.BytesIO()
            torch.save(result, buf)
            queue.put(("ok", buf.getvalue()))
    except BaseException:
        queue.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        raise
    finally:
        # Tear the process group down before exit: gloo's threads must not outlive it.
        from tpserve.distributed import destroy_distributed

        destroy_distributed()


def run_ranks(world_size: int, fn, *args, timeout: float = 300.0):
    """fn(*args) runs on every rank after the torchrun variables are set; returns rank 0's result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        status, payload = queue.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if status != "ok":
        raise AssertionError(payload)
    payload = torch.load(io.BytesIO(payload), weights_only=False)
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world_size, f"rank exit codes {codes}"
    return payload


def watch_scheduler(engine) -> list[int]:
    """Wrap the engine's scheduler so every step checks the block-manager invariant; returns a
    one-element list that counts preemptions as the engine runs."""
    preemptions = [0]
    schedule = engine.scheduler.schedule

    def checked(*args, **kwargs):
        out = schedule(*args, **kwargs)
        preemptions[0] += len(out.preempted)
        engine.block_manager.check_invariants(engine.scheduler.running)
        return out

    engine.scheduler.schedule = checked
    return preemptions



class LocalGroup(TPGroup):
    """One rank of a simulated tensor-parallel group: layers built with it shard as on that rank,
    while collectives are left to the test (all_reduce and gather are identities)."""

    def all_reduce(self, x):
        return x

    def gather_to_first(self, x, dim=-1):
        return x


def local_ranks(tp_size: int) -> list[LocalGroup]:
    """Every rank of a simulated group of tp_size."""
    return [LocalGroup(tp_rank=r, tp_size=tp_size) for r in range(tp_size)]
