"""What the front end knows about the server: lifecycle phase, model facts, the engine loop."""

from __future__ import annotations

import time

from tpserve.server.engine_loop import EngineLoop
from tpserve.v1 import generation_pb2 as pb

LOADING, SERVING, DRAINING, FAILED, STOPPED = "loading", "serving", "draining", "failed", "stopped"


class ServerState:
    def __init__(self, served_model_name: str) -> None:
        self.served_model_name = served_model_name
        self.phase = LOADING
        self.engine_loop: EngineLoop | None = None
        self.tokenizer = None
        self.model_info: pb.GetModelInfoResponse | None = None
        self.block_size = 0
        self.start_time = time.monotonic()

    def require_serving(self) -> EngineLoop | None:
        loop = self.engine_loop
        if self.phase != SERVING or loop is None or loop.draining or loop.failed:
            return None
        return loop

    def unavailable_reason(self) -> str:
        loop = self.engine_loop
        if loop is not None and loop.failed:
            return f"the server's process group has failed: {loop.failed}"
        if self.phase == LOADING:
            return "the model is still loading"
        if self.phase in (DRAINING, STOPPED) or (loop is not None and loop.draining):
            return "the server is draining and accepts no new requests"
        return f"the server is {self.phase}"

    def server_info(self) -> pb.GetServerInfoResponse:
        loop = self.engine_loop
        info = pb.GetServerInfoResponse(uptime_s=time.monotonic() - self.start_time, block_size=self.block_size,
                                        draining=self.phase in (DRAINING, STOPPED))
        if loop is None:
            return info
        s = loop.stats
        info.num_waiting_requests = s["num_waiting"]
        info.num_running_requests = s["num_running"]
        info.kv_blocks_free = s["kv_blocks_free"]
        info.kv_blocks_cached = s["kv_blocks_cached"]
        info.kv_blocks_in_use = s["kv_blocks_in_use"]
        info.kv_blocks_total = s["kv_blocks_total"]
        info.prefix_cache_hit_rate = s["prefix_cache_hit_rate"]
        info.num_finished_requests = loop.num_finished
        if s.get("speculation"):
            info.speculation.CopyFrom(pb.SpeculationStats(**s["speculation"]))
        return info
