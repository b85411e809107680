"""python -m tpserve.profile for real: a short sweep on the bundled model (its own torchrun servers),
the files it writes, resuming an interrupted sweep, and the operating point served."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import matplotlib.image
import pytest

from tests.e2e.test_http import metrics_of
from tests.server_proc import ROOT, ServerProc
from tpserve.bundled import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.slow
# 10 KV blocks of 16 tokens hold two requests of at most 48 + 16 tokens (4 blocks each), not four:
# batch 4 preempts, and the sweep must end there on memory.
SWEEP = ["--batch-sizes", "1,2,4,8", "--input-len", "16:48", "--output-len", "8:16", "--rounds", "2",
         "--min-requests", "4", "--slo-ttft-p95", "2", "--min-tokens-per-user", "5", "--dtype", "float32",
         "--num-kv-blocks", "10"]


def profile(out, *extra):
    res = subprocess.run([sys.executable, "-m", "tpserve.profile", "--out", str(out), *SWEEP, *extra],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    res = profile(out)
    return out, res


def test_the_sweep_writes_every_file_and_the_chosen_point_meets_the_slo(swept):
    out, res = swept
    report = json.loads((out / "report.json").read_text())
    points = report["points"]
    assert [p["batch_size"] for p in points] == [1, 2, 4]
    assert points[2]["over_memory"] and points[2]["preemptions"] > 0 and not points[2]["meets_slo"]
    assert report["stopped"]["float"].startswith("batch 4: the KV cache could not hold the batch")
    assert points[2]["peak_kv_usage"] >= 0.6  # the server's high-water mark: the cache overflowed
    with open(out / "points.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["batch_size"]) for r in rows] == [p["batch_size"] for p in points]
    for name in ("throughput_vs_ttft.png", "throughput_vs_per_user.png", "latency_vs_batch.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(out / name).shape
        assert width > 300 and height > 200
        assert f"]({name})" in (out / "report.md").read_text()
    best = report["chosen"]
    assert best is not None and "chosen: batch" in res.stdout
    # The chosen point meets the SLO in its own measurement...
    assert best["ttft_p95_ms"] <= 2000 and 1000 / best["tpot_p95_ms"] >= 5 and best["preemptions"] == 0
    for p in points:
        assert p["out_tok_per_s"] > 0 and p["ttft_p95_ms"] > 0 and p["peak_kv_usage"] >= 0
    # ... and the next larger batch either misses it or adds no throughput.
    bigger = [p for p in points if p["batch_size"] > best["batch_size"]]
    assert bigger and (bigger[0]["misses"] or bigger[0]["over_memory"]
                       or bigger[0]["out_tok_per_s"] <= best["out_tok_per_s"])
    op = json.loads((out / "operating_point.json").read_text())
    assert op["flags"]["--max-num-seqs"] == str(best["batch_size"]) and op["slo_ttft_s"] == 2.0
    assert op["flags"]["--num-kv-blocks"] == "10"  # the engine flags it was measured with travel along
    assert op["measured"]["ttft_p95_ms"] == best["ttft_p95_ms"]


def test_an_interrupted_sweep_resumes_where_it_stopped(swept, tmp_path):
    out, _ = swept
    runs = (out / "runs.jsonl").read_text().splitlines()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "settings.json").write_text((out / "settings.json").read_text())
    (resumed / "runs.jsonl").write_text("\n".join(runs[:-1]) + "\n")  # the last point never finished
    profile(resumed)
    again = (resumed / "runs.jsonl").read_text().splitlines()
    assert again[:-1] == runs[:-1] and len(again) == len(runs)
    assert json.loads(again[-1])["batch_size"] == json.loads(runs[-1])["batch_size"]
    logs = sorted(p.name for p in (resumed / "logs").iterdir())
    assert logs == [f"float-b{json.loads(runs[-1])['batch_size']}.log"]  # only the missing point had a server
    res = subprocess.run([sys.executable, "-m", "tpserve.profile", "--out", str(resumed), *SWEEP, "--seed", "9"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "other settings" in res.stderr and "seed" in res.stderr


def test_the_operating_point_is_what_the_server_serves(swept, tmp_path):
    out, _ = swept
    op = json.loads((out / "operating_point.json").read_text())
    srv = ServerProc(DEFAULT_MODEL_DIR, tmp_path / "server.log", nproc=1,
                     extra=["--operating-point", str(out / "operating_point.json")])
    try:
        srv.wait_ready()
        info = next(dict(k[1]) for k in metrics_of(srv) if k[0] == "tpserve:serving_config_info")
        assert info["max_num_seqs"] == op["flags"]["--max-num-seqs"] and info["slo_ttft_s"] == "2.0"
        assert "tuned for SLO" in srv.tail(20000)
    finally:
        srv.close()


def test_sigterm_stops_the_sweep_and_its_server_and_keeps_finished_runs(tmp_path):
    import signal
    import time

    out = tmp_path / "p"
    proc = subprocess.Popen([sys.executable, "-m", "tpserve.profile", "--out", str(out), *SWEEP],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not (out / "runs.jsonl").exists() or not (out / "runs.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "resumes the sweep" in err
    kept = (out / "runs.jsonl").read_text().splitlines()
    assert len(kept) >= 1 and json.loads(kept[0])["batch_size"] == 1
    for log in (out / "logs").iterdir():  # every server it started is gone
        port = log.read_text().split("--port ")[1].split()[0]
        found = subprocess.run(["pgrep", "-f", f"--port {port} "], capture_output=True, text=True).stdout.split()
        assert not found, f"{log.name}: server processes {found} still run"


def test_a_running_server_is_swept_by_concurrency_only(tmp_path):
    srv = ServerProc(DEFAULT_MODEL_DIR, tmp_path / "server.log", nproc=1, extra=["--max-num-seqs", "8"])
    try:
        srv.wait_ready()
        out = tmp_path / "p"
        sweep = SWEEP[:-4]  # no server flags: the running server keeps its own
        assert sweep[:2] == ["--batch-sizes", "1,2,4,8"]
        sweep[1] = "1,2"
        res = subprocess.run([sys.executable, "-m", "tpserve.profile", "--out", str(out), "--server", srv.http_url,
                              *sweep], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert [p["batch_size"] for p in report["points"]] == [1, 2]
        assert not (out / "logs").exists()  # no server of its own
        op = json.loads((out / "operating_point.json").read_text())
        assert op["flags"] == {"--max-num-seqs": str(report["chosen"]["batch_size"])}
        refused = subprocess.run([sys.executable, "-m", "tpserve.profile", "--out", str(tmp_path / "q"), "--server",
                                  srv.http_url, "--dtype", "float32"], capture_output=True, text=True, cwd=ROOT)
        assert refused.returncode == 2 and "--dtype float32 would be ignored" in refused.stderr
    finally:
        srv.close()
