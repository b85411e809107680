"""Serve a model over gRPC and HTTP with tensor parallelism.

    torchrun --nproc-per-node N launch/serve.py [--model DIR] [--host H] [--port 50051] [--http-port 8000] \
        [--served-model-name NAME] [--chat-template FILE] [--no-metrics] [engine flags as in generate.py]

Rank 0 serves tpserve.v1.Generation, the KServe Open Inference Protocol, grpc.health.v1 and
reflection over gRPC, the OpenAI API and Prometheus metrics over HTTP, and runs the engine loop; the other ranks run the worker loop. SIGTERM drains: readiness
turns NOT_SERVING, new requests are refused, in-flight ones finish within --shutdown-timeout, then
every rank exits 0. If any rank fails, rank 0 ends open streams with UNAVAILABLE and every rank
exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

from tpserve.config import ConfigError
from tpserve.distributed import DistEnv, destroy_distributed, init_distributed
from tpserve.engine.setup import add_engine_args, build_runtime, engine_args_from
from tpserve.engine.worker import run_worker
from tpserve.server.security import Security, add_security_args
from tpserve.weights import CheckpointError

logger = logging.getLogger("tpserve.serve")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--operating-point", default=None,
                   help="operating_point.json from python -m tpserve.profile: its flags become the defaults "
                        "(flags given here still win) and its p95 TTFT SLO sets --slo-ttft")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP port (0: no HTTP)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file (default: the tokenizer's)")
    p.add_argument("--no-metrics", dest="metrics", action="store_false", help="no Prometheus metrics")
    p.add_argument("--served-model-name", default=None, help="default: the model directory's name")
    p.add_argument("--small-model-name", default=None,
                   help="the name requests give to choose the small model (default: its directory's name)")
    p.add_argument("--max-queued-requests", type=int, default=1024, help="waiting requests before RESOURCE_EXHAUSTED")
    p.add_argument("--max-message-bytes", type=int, default=16 * 2**20, help="largest gRPC message accepted")
    p.add_argument("--shutdown-timeout", type=float, default=25.0,
                   help="seconds in-flight requests get on SIGTERM (torchrun kills workers 30 s after forwarding it)")
    p.add_argument("--slo-ttft", type=float, default=None,
                   help="admission control: refuse (RESOURCE_EXHAUSTED / 429) a request whose predicted time to first "
                        "token exceeds this many seconds (default, or 0: admit all)")
    p.add_argument("--slo-ttft-margin", type=float, default=0.8,
                   help="admit while the predicted TTFT is under this fraction of --slo-ttft")
    p.add_argument("--dist-timeout", type=float, default=300.0, help="seconds a collective may wait before failing")
    p.add_argument("--step-timeout", type=float, default=None,
                   help="stall watchdog: seconds one engine step may take before the group is declared stalled, "
                        "open requests fail with UNAVAILABLE and every rank exits (default: adaptive, 20x the "
                        "longest step so far, between 10 and 12 s; workers wait twice that plus 4 s). "
                        "Raise it where one step can legitimately take longer (a large model on CPU)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    add_security_args(p)
    add_engine_args(p)
    pre, _ = p.parse_known_args(argv)
    if pre.operating_point is not None:
        p.set_defaults(**operating_point_defaults(p, pre.operating_point))
    return p.parse_args(argv)


def operating_point_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """The profiler's chosen flags as parser defaults (explicit flags still win), and its TTFT SLO
    as --slo-ttft; logs what it applies and the SLO it was tuned for."""
    import json

    try:
        point = json.loads(Path(path).read_text())
        flags = point["flags"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--operating-point {path!r} is not a profiler operating point: {e}") from None
    by_flag = {opt: action for action in parser._actions for opt in action.option_strings}
    defaults = {}
    for flag, value in flags.items():
        action = by_flag.get(flag)
        if action is None:
            raise ConfigError(f"--operating-point {path!r}: {flag} is not a flag of launch/serve.py")
        if action.nargs == 0:  # a switch: store_true / store_false
            defaults[action.dest] = action.const if value is True else action.default
        else:
            defaults[action.dest] = action.type(value) if action.type else value
    if point.get("slo_ttft_s") is not None:
        defaults.setdefault("slo_ttft", float(point["slo_ttft_s"]))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if point.get("tp") and point["tp"] != world:
        logger.warning("operating point %s was measured at TP %s; this server has %d ranks", path, point["tp"], world)
    logger.info("operating point %s: batch %s of %s, tuned for SLO %s (objective %s; measured %s); defaults %s",
                path, point.get("batch_size"), point.get("candidate"), point.get("slo"), point.get("objective"),
                point.get("measured"), defaults)
    return defaults


def small_model_name(args, engine_args, served_model_name: str) -> str:
    from tpserve.engine.setup import resolve_small_dir
    from tpserve.route.router import AUTO

    name = args.small_model_name or Path(resolve_small_dir(engine_args)).name
    if served_model_name == AUTO:
        raise ConfigError(f"--served-model-name {AUTO!r} is the name that lets the router choose; pick another")
    if name in (served_model_name, AUTO):
        raise ConfigError(f"the small model's name {name!r} must differ from the target's ({served_model_name!r}) "
                          f"and from {AUTO!r}; pass --small-model-name")
    return name


def serve_rank0(args, tp) -> int:
    from tpserve.server.app import FrontEnd
    from tpserve.server.core import ServingCore
    from tpserve.server.engine_loop import EngineLoop
    from tpserve.server.grpc_listener import GrpcListener
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.server.state import DRAINING, FAILED, SERVING, STOPPED, ModelInfo, ServerState
    from tpserve.distributed.watchdog import StepBound, Watchdog

    engine_args = engine_args_from(args)
    security = Security.from_args(args)
    state = ServerState(args.served_model_name or Path(engine_args.model).name)
    metrics = make_metrics(args, engine_args, state, tp.tp_size) if args.metrics else None
    if metrics is not None:
        security.on_refused = metrics.observe_unauthenticated
    core = ServingCore(state, metrics)
    listeners = [GrpcListener(core, args.host, args.port, args.max_message_bytes, security, args.health_port)]
    if args.http_port:
        from tpserve.server.http import HttpListener

        listeners.append(HttpListener(core, args.host, args.http_port, read_chat_template(args.chat_template),
                                      security))
    front = FrontEnd(state, listeners)
    front.start()
    drain_requested = []

    def on_signal(signum, frame):
        logger.info("received signal %d: draining", signum)
        drain_requested.append(signum)
        if state.door is not None:
            state.door.begin_drain(args.shutdown_timeout)
            front.set_phase(DRAINING)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runner, engine = build_runtime(engine_args, tp)
    admission = None
    if args.slo_ttft:
        from tpserve.server.admission import AdmissionController

        admission = AdmissionController(args.slo_ttft, engine_args.max_num_seqs, engine_args.max_num_batched_tokens,
                                        args.slo_ttft_margin)
    bound = StepBound(args.step_timeout)

    def on_stall(message: str) -> None:  # the watchdog thread: the engine thread is stuck in a step
        loop.stalled(message)
        front.set_phase(FAILED, timeout=2.0)
        front.stop(grace_s=1.0)  # let the error events and statuses reach the clients

    watchdog = Watchdog("rank 0", bound.seconds, on_stall, tp.local_peer_pids).start()
    loop = EngineLoop(engine, args.max_queued_requests, on_step=metrics.observe_step if metrics else None,
                      admission=admission, watchdog=watchdog, step_bound=bound)
    if engine.small is not None:
        state.small_model_name = small_model_name(args, engine_args, state.served_model_name)
    state.attach(engine, loop, ModelInfo.describe(state.served_model_name, runner.model_config, engine, tp.tp_size,
                                                  state.small_model_name or ""))
    if admission is not None:
        loop.calibrate(lambda rid, ids, n: state.requests.make(rid, prompt_token_ids=ids,
                                                               params=SamplingParams(max_tokens=n, ignore_eos=True)))
        a, b, c = admission.cost.coefficients()
        logger.info("admission control: --slo-ttft %.3f s (margin %.2f); step cost %.2f ms + %.4f ms/token + "
                    "%.3f ms/sequence", args.slo_ttft, args.slo_ttft_margin, a * 1e3, b * 1e3, c * 1e3)
    front.set_phase(SERVING)
    if drain_requested:
        loop.begin_drain(args.shutdown_timeout)
        front.set_phase(DRAINING)
    code = loop.run()
    watchdog.stop()
    if code != 0:
        front.set_phase(FAILED)
        front.stop(grace_s=1.0)
        logging.shutdown()
        os._exit(code)  # peers may be gone: do not wait on process-group teardown
    front.set_phase(STOPPED)
    front.stop(grace_s=2.0)
    return 0


def read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"--chat-template {path!r} is not a file")
    return Path(path).read_text()


def make_metrics(args, engine_args, state, tp_size: int):
    """Prometheus metrics fed from the engine loop's statistics snapshot (read at scrape time)."""
    from tpserve.config import ModelConfig
    from tpserve.metrics import ServerMetrics

    max_model_len = engine_args.max_model_len or ModelConfig.from_dir(engine_args.model).max_position_embeddings
    config = {"tp_size": str(tp_size), "dtype": engine_args.dtype, "block_size": str(engine_args.block_size),
              "max_num_seqs": str(engine_args.max_num_seqs),
              "max_num_batched_tokens": str(engine_args.max_num_batched_tokens), "max_model_len": str(max_model_len),
              "enable_prefix_caching": str(engine_args.enable_prefix_caching),
              "speculative_method": engine_args.speculative_method}
    if args.slo_ttft:
        config["slo_ttft_s"] = str(args.slo_ttft)
    return ServerMetrics(state.served_model_name, lambda: state.door.stats if state.door is not None else None,
                         max_model_len, engine_args.max_num_batched_tokens, config, args.slo_ttft or None)


def worker_watchdog(args, tp, health=None):
    """A worker's bound on silence from rank 0 (tpserve.distributed.watchdog.worker_bound_s). On a
    stall, `health` (if any) turns NOT_SERVING."""
    from tpserve.distributed.watchdog import StepBound, Watchdog, worker_bound_s

    def on_stall(message: str) -> None:
        if health is not None:
            from grpc_health.v1 import health_pb2

            health.servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    bound_s = worker_bound_s(StepBound(args.step_timeout).ceiling_s)
    return Watchdog(f"worker rank {tp.tp_rank}", lambda: bound_s, on_stall, tp.local_peer_pids).start()


def worker_health(args):
    """--health-port on a worker node (its first local rank; global rank 0 is on another node):
    plaintext grpc.health.v1 whose service "" is SERVING while this rank is in its group's worker
    loop (it exits, and the port closes, when the group fails; NOT_SERVING while its watchdog ends
    it). None elsewhere."""
    if not args.health_port or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return None
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if server.add_insecure_port(f"{args.host}:{args.health_port}") == 0:
        raise OSError(f"could not bind the worker's gRPC health server to {args.host}:{args.health_port}")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return SimpleNamespace(server=server, servicer=servicer)


def die_with_launcher() -> None:
    """Under torchrun, exit when torchrun itself dies (say it is SIGKILLed): orphaned ranks would
    otherwise keep their port and accelerator memory forever. A normal SIGTERM to torchrun is
    forwarded and drained as usual before torchrun exits. Linux only; elsewhere a no-op."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    launcher = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != launcher:  # it died before prctl took effect
        os._exit(1)


def main(argv=None) -> int:
    args = parse_args(argv)
    die_with_launcher()
    tp = init_distributed(DistEnv.from_environ(), device_type=args.device, timeout_s=args.dist_timeout)
    try:
        if tp.is_first:
            return serve_rank0(args, tp)
        # Rank 0 coordinates the drain; a worker leaves when told to or when the group fails.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        runner, _ = build_runtime(engine_args_from(args), tp)
        health = worker_health(args)
        run_worker(runner, worker_watchdog(args, tp, health))
        return 0
    finally:
        destroy_distributed()


def cli(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return main(argv)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
