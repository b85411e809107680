"""Process groups for tensor parallelism.

Every rank has two groups over the same members: the *device* group (NCCL on CUDA, gloo on CPU)
carries tensors, and the *cpu* group (always gloo) carries small control messages from rank 0, so a
control message never waits behind GPU work. Layers never read globals: they receive a `TPGroup`.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """What torchrun (or Slurm/Kubernetes through torchrun) tells a process about its place."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> "DistEnv":
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        port = env.get("MASTER_PORT")
        return cls(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(port) if port else None,
        )


@dataclass
class TPGroup:
    """A tensor-parallel group as seen by one rank.

    `tp_size == 1` needs no process group at all, so layers can be built and tested standalone.
    """

    tp_rank: int = 0
    tp_size: int = 1
    device_group: object | None = None
    cpu_group: object | None = None
    device: torch.device = torch.device("cpu")
    local_peer_pids: tuple[int, ...] = ()  # the group's processes on this host, this one included

    def local_peers(self) -> tuple[int, ...]:
        """Exchange (host, pid) over the cpu group once, as plain integers (nothing is pickled);
        the pids of the ranks on this host."""
        if self.tp_size == 1:
            return (os.getpid(),)
        host = host_key().encode("utf-8")[:255]
        mine = torch.zeros(257, dtype=torch.int64)
        mine[0], mine[1] = os.getpid(), len(host)
        mine[2 : 2 + len(host)] = torch.tensor(list(host), dtype=torch.int64)
        everyone = [torch.empty_like(mine) for _ in range(self.tp_size)]
        dist.all_gather(everyone, mine, group=self.cpu_group)
        return tuple(int(t[0]) for t in everyone if t[1] == len(host) and bool((t[2 : 2 + len(host)] == mine[2 : 2 + len(host)]).all()))

    @property
    def is_first(self) -> bool:
        return self.tp_rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group in place and return it."""
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.device_group)
        return x

    def gather_to_first(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Concatenate every rank's `x` along `dim` on rank 0; other ranks get None.

        All shards must have the same shape (vocab-parallel shards are padded to that end).
        """
        if self.tp_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.tp_size)] if self.is_first else None
        dist.gather(x, parts, dst=self._global_rank(0), group=self.device_group)
        return torch.cat(parts, dim=dim) if self.is_first else None

    def broadcast_bytes(self, data: bytes | None = None, max_bytes: int = 64 << 20) -> bytes:
        """Send rank 0's `data` to every rank over the cpu group (a length, then the bytes); the
        others pass None and get it. Never pickles: what the bytes mean is the caller's typed
        decoder's business. A length over `max_bytes` is refused before anything is allocated."""
        if self.tp_size == 1:
            return data
        src = self._global_rank(0)
        length = torch.tensor([len(data) if self.is_first else 0], dtype=torch.int64)
        dist.broadcast(length, src=src, group=self.cpu_group)
        n = int(length.item())
        if not 0 <= n <= max_bytes:
            raise ValueError(f"rank 0 announced a control message of {n} bytes; the limit is {max_bytes}")
        payload = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_first and n
                   else torch.empty(n, dtype=torch.uint8))
        if n:
            dist.broadcast(payload, src=src, group=self.cpu_group)
        return data if self.is_first else payload.numpy().tobytes()

    def barrier(self) -> None:
        if self.tp_size > 1:
            dist.barrier(group=self.cpu_group)

    def _global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.cpu_group, group_rank)


def host_key() -> str:
    """What "the same host" means for signalling a peer by pid: the same hostname, kernel boot and
    pid namespace (containers that share a hostname do not share pids)."""
    import socket

    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:  # not Linux: the hostname alone
        pass
    return "|".join(parts)


def init_distributed(
    env: DistEnv | None = None,
    device_type: str | None = None,
    timeout_s: float = 600.0,
) -> TPGroup:
    """Join the process group described by `env` (torchrun's variables by default).

    All ranks of the job form one tensor-parallel group, so the same code runs on one node or
    across nodes (`torchrun --nnodes`). `device_type` defaults to CUDA when it is available.
    """
    env = env or DistEnv.from_environ()
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if env.world_size == 1:
        return TPGroup(device=device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout
        )
    ranks = list(range(env.world_size))
    device_group = dist.group.WORLD
    cpu_group = dist.new_group(ranks, backend="gloo", timeout=timeout)
    if device_type == "cpu":
        # One gloo group would serve both, but a separate one keeps control traffic ordered
        # independently of tensor collectives, exactly as on GPU.
        device_group = dist.new_group(ranks, backend="gloo", timeout=timeout)
    tp = TPGroup(
        tp_rank=env.rank,
        tp_size=env.world_size,
        device_group=device_group,
        cpu_group=cpu_group,
        device=device,
    )
    tp.local_peer_pids = tp.local_peers()  # what a stall watchdog kills (tpserve.distributed.watchdog)
    return tp


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
