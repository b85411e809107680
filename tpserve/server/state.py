"""What the front end knows about the server, in plain dataclasses: lifecycle phase, model facts,
the request factory and the door to the engine loop. Filled in by the main thread at start-up;
the front-end thread only reads it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tpserve.engine.outputs import EngineStats
from tpserve.errors import Unavailable
from tpserve.server.engine_loop import EngineLoop
from tpserve.server.requests import RequestFactory

LOADING, SERVING, DRAINING, FAILED, STOPPED = "loading", "serving", "draining", "failed", "stopped"


@dataclass(frozen=True)
class ModelInfo:
    served_model_name: str
    architecture: str
    max_model_len: int
    vocab_size: int
    tp_size: int
    quantization: str
    dtype: str
    has_tokenizer: bool
    small_model_name: str = ""  # empty without a small model

    @classmethod
    def describe(cls, served_model_name: str, model_config, engine, tp_size: int,
                 small_model_name: str = "") -> ModelInfo:
        """The facts of a model (its tpserve.config.ModelConfig) as `engine` serves it."""
        return cls(served_model_name=served_model_name, architecture=model_config.architecture,
                   max_model_len=engine.scheduler.config.max_model_len, vocab_size=engine.vocab_size,
                   tp_size=tp_size, quantization=model_config.quantization,
                   dtype=str(model_config.dtype).removeprefix("torch."), has_tokenizer=engine.tokenizer is not None,
                   small_model_name=small_model_name)


@dataclass(frozen=True)
class ServerInfo:
    uptime_s: float
    block_size: int
    draining: bool
    num_finished_requests: int = 0
    stats: EngineStats | None = None  # None while loading


@dataclass
class ServerState:
    served_model_name: str
    small_model_name: str | None = None  # with --small-model
    phase: str = LOADING
    door: EngineLoop | None = None
    requests: RequestFactory | None = None
    tokenizer: object = None
    model_info: ModelInfo | None = None
    block_size: int = 0
    start_time: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)  # wall clock, for OpenAI's `created`

    def attach(self, engine, door: EngineLoop, model_info: ModelInfo) -> None:
        """Main thread, before serving: copy what the front end needs of the engine once."""
        self.requests = RequestFactory.for_engine(engine)
        self.tokenizer = engine.tokenizer
        self.block_size = engine.block_manager.block_size
        self.model_info = model_info
        self.door = door

    def require_serving(self) -> EngineLoop:
        """The door, or Unavailable naming why requests are not taken now."""
        door = self.door
        if self.phase != SERVING or door is None or door.draining or door.failed:
            raise Unavailable(self.unavailable_reason())
        return door

    def unavailable_reason(self) -> str:
        door = self.door
        if door is not None and door.failed:
            return f"the server's process group has failed: {door.failed}"
        if self.phase == LOADING:
            return "the model is still loading"
        if self.phase in (DRAINING, STOPPED) or (door is not None and door.draining):
            return "the server is draining and accepts no new requests"
        return f"the server is {self.phase}"

    def server_info(self) -> ServerInfo:
        door = self.door
        info = ServerInfo(uptime_s=time.monotonic() - self.start_time, block_size=self.block_size,
                          draining=self.phase in (DRAINING, STOPPED))
        if door is None:
            return info
        return ServerInfo(info.uptime_s, info.block_size, info.draining, door.num_finished, door.stats)
