"""The profiler's pieces without servers: the SLO verdicts, the choice of the operating point,
length distributions and datasets, and --operating-point applied to launch/serve.py's flags."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tpserve.errors import ConfigError
from tpserve.profile.report import choose, operating_point
from tpserve.profile.sweep import SLO, aggregate
from tpserve.profile.workload import LengthDist, load_dataset, synthetic
from tests.server_proc import ROOT


def run(batch, tok_s, ttft_p95_ms, tpot_p95_ms, preemptions=0, rejected=0, candidate="float"):
    return {"candidate": candidate, "batch_size": batch, "repeat": 0, "out_tok_per_s": tok_s, "req_per_s": 1.0,
            "ttft_p50_ms": ttft_p95_ms / 2, "ttft_p95_ms": ttft_p95_ms, "ttft_p99_ms": ttft_p95_ms,
            "tpot_p50_ms": tpot_p95_ms, "tpot_p95_ms": tpot_p95_ms, "e2e_p95_ms": 10 * ttft_p95_ms,
            "tok_per_s_per_user_p95": 1000 / tpot_p95_ms, "preemptions": preemptions, "rejected": rejected,
            "peak_kv_usage": 0.1 * batch, "goodput_req_per_s": 0.5, "e2e_p50_ms": ttft_p95_ms}


SWEEP = [run(1, 100, 50, 10), run(4, 300, 200, 20), run(16, 700, 800, 40), run(64, 900, 3000, 80)]


def test_slo_misses_name_the_value_and_the_limit():
    slo = SLO(ttft_p95_s=1.0, min_tokens_per_user=30)
    p = aggregate([run(64, 900, 3000, 80)], slo)
    assert p["misses"] == ["p95 TTFT 3.000 s > 1 s", "tokens/s per user (p95) 12.5 < 30"]
    assert not p["meets_slo"]
    assert aggregate([run(4, 300, 200, 20)], slo)["meets_slo"]


def test_throughput_objective_takes_the_largest_batch_inside_the_slo_and_says_why():
    slo = SLO(ttft_p95_s=1.0, min_tokens_per_user=20)
    points = [aggregate([r], slo) for r in SWEEP]
    best, why = choose(points, slo, "throughput")
    assert best["batch_size"] == 16
    assert "highest output throughput (700.0 tok/s) of the 3 points" in why
    assert "next larger batch, 64: p95 TTFT 3.000 s > 1 s" in why


def test_latency_objective_and_memory_limit():
    slo = SLO(ttft_p95_s=1.0)
    points = [aggregate([r], slo) for r in [*SWEEP[:2], run(16, 700, 800, 40, preemptions=3)]]
    assert points[2]["over_memory"] and not points[2]["meets_slo"]
    best, why = choose(points, slo, "throughput")
    assert best["batch_size"] == 4 and "3 preemptions" in why
    best, _ = choose(points, slo, "latency")
    assert best["batch_size"] == 1


def test_no_point_meets_the_slo():
    slo = SLO(ttft_p95_s=0.01)
    best, why = choose([aggregate([r], slo) for r in SWEEP], slo, "throughput")
    assert best is None and "no point meets the SLO (p95 TTFT <= 0.01 s)" in why and "batch 1" in why


def test_repeats_give_medians_and_the_spread():
    slo = SLO()
    p = aggregate([run(8, 100, 50, 10), run(8, 130, 70, 10), run(8, 110, 60, 10)], slo)
    assert p["out_tok_per_s"] == 110 and (p["out_tok_per_s_min"], p["out_tok_per_s_max"]) == (100, 130)
    assert p["ttft_p95_ms"] == 60 and p["repeats"] == 3


@pytest.mark.parametrize("text,err", [("0", "1 <= LO"), ("8:4", "1 <= LO"), ("x", "N or LO:HI"), ("1:2:3", "N or LO:HI")])
def test_length_distributions_refuse_bad_values(text, err):
    with pytest.raises(ConfigError, match=err):
        LengthDist.parse(text, "--input-len")


def test_dataset_and_synthetic_workloads(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt_token_ids": [5, 6, 7], "output_len": 9}\n\n{"prompt_token_ids": [8]}\n')
    work = load_dataset(path, None, LengthDist(4, 4), seed=0)
    assert work == [([5, 6, 7], 9), ([8], 4)]
    path.write_text('{"prompt": "def f():"}\n')
    with pytest.raises(ConfigError, match="needs a model with a tokenizer"):
        load_dataset(path, None, LengthDist(4, 4), seed=0)
    a = synthetic(5, LengthDist(3, 9), LengthDist(2, 2), None, 100, seed=1)
    assert a == synthetic(5, LengthDist(3, 9), LengthDist(2, 2), None, 100, seed=1)
    assert all(3 <= len(p) <= 9 and n == 2 and all(3 <= t < 100 for t in p) for p, n in a)


def load_serve_module():
    spec = importlib.util.spec_from_file_location("tpserve_launch_serve", ROOT / "launch" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_operating_point_flags_become_defaults_and_explicit_flags_win(tmp_path):
    slo = SLO(ttft_p95_s=1.5)
    best = aggregate([run(16, 700, 800, 40)], slo)
    point = operating_point(best, ["--model", "/m", "--max-num-seqs", "16", "--max-num-batched-tokens", "512",
                                   "--no-prefix-caching"], slo, "throughput", {"tp": 1})
    path = tmp_path / "op.json"
    path.write_text(json.dumps(point))
    serve = load_serve_module()
    args = serve.parse_args(["--operating-point", str(path)])
    assert (args.model, args.max_num_seqs, args.max_num_batched_tokens) == ("/m", 16, 512)
    assert args.enable_prefix_caching is False and args.slo_ttft == 1.5
    args = serve.parse_args(["--operating-point", str(path), "--max-num-seqs", "7", "--slo-ttft", "3"])
    assert args.max_num_seqs == 7 and args.slo_ttft == 3.0 and args.max_num_batched_tokens == 512
    path.write_text(json.dumps({**point, "flags": {"--bogus": "1"}}))
    with pytest.raises(ConfigError, match="--bogus is not a flag of launch/serve.py"):
        serve.parse_args(["--operating-point", str(path)])


def test_reports_are_written_without_an_slo_and_without_a_choice(tmp_path):
    from tpserve.profile.report import write_all

    for slo in (SLO(), SLO(ttft_p95_s=0.001)):
        points = [aggregate([r], slo) for r in SWEEP]
        best, why = choose(points, slo, "throughput")
        settings = {"model": "m", "tp": 1, "protocol": "http", "workload": {}, "repeats": 1}
        write_all(tmp_path, points, SWEEP, best, why, slo, "throughput", settings, {"float": "done"},
                  ["--max-num-seqs", "64"] if best else None)
        assert (tmp_path / "latency_vs_batch.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "operating_point.json").exists() == (best is not None)
        assert why in (tmp_path / "report.md").read_text()
        (tmp_path / "operating_point.json").unlink(missing_ok=True)
