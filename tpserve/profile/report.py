"""Choosing the operating point, and the profiler's output files: report.json, points.csv,
report.md, three PNG plots and operating_point.json."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from tpserve.profile.sweep import SLO

CSV_COLUMNS = ["candidate", "batch_size", "repeats", "out_tok_per_s", "out_tok_per_s_min", "out_tok_per_s_max",
               "req_per_s", "tok_per_s_per_user_p50", "tok_per_s_per_user_p95", "ttft_p50_ms", "ttft_p95_ms",
               "ttft_p99_ms", "tpot_p50_ms", "tpot_p95_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p95_ms", "itl_p99_ms",
               "e2e_p50_ms", "e2e_p95_ms", "e2e_p99_ms", "goodput_req_per_s", "preemptions", "rejected",
               "peak_kv_usage", "meets_slo", "misses"]


def choose(points: list[dict], slo: SLO, objective: str) -> tuple[dict | None, str]:
    """The point to serve at and why. throughput: the highest output tokens/s among the points
    that meet the SLO and fit in memory; latency: the lowest p95 end-to-end latency among them."""
    ok = [p for p in points if p["meets_slo"]]
    if not ok:
        closest = min(points, key=lambda p: (len(p["misses"]) + p["over_memory"], p["ttft_p95_ms"]), default=None)
        why = "no point meets the SLO (" + slo.describe() + ")"
        if closest is not None:
            why += f"; the closest, batch {closest['batch_size']} ({closest['candidate']}), misses: " + \
                   "; ".join(closest["misses"] or ["memory"])
        return None, why
    if objective == "throughput":
        best = max(ok, key=lambda p: (p["out_tok_per_s"], -p["batch_size"]))
        why = (f"the highest output throughput ({best['out_tok_per_s']:.1f} tok/s) of the {len(ok)} points that "
               f"meet the SLO ({slo.describe()})")
    else:
        best = min(ok, key=lambda p: (p["e2e_p95_ms"], -p["out_tok_per_s"]))
        why = (f"the lowest p95 end-to-end latency ({best['e2e_p95_ms'] / 1000:.3f} s) of the {len(ok)} points that "
               f"meet the SLO ({slo.describe()})")
    why = (f"batch {best['batch_size']} ({best['candidate']}): p95 TTFT {best['ttft_p95_ms'] / 1000:.3f} s, "
           f"{best['tok_per_s_per_user_p95']:.1f} tokens/s per user (p95), {why}")
    bigger = sorted((p for p in points if p["candidate"] == best["candidate"] and p["batch_size"] > best["batch_size"]),
                    key=lambda p: p["batch_size"])
    if bigger:
        nxt = bigger[0]
        reason = "; ".join(nxt["misses"]) if nxt["misses"] else (
            f"{nxt['preemptions']:.0f} preemptions / {nxt['rejected']:.0f} rejections: the KV cache cannot hold it"
            if nxt["over_memory"] else f"only {nxt['out_tok_per_s']:.1f} tok/s")
        why += f"; the next larger batch, {nxt['batch_size']}: {reason}"
    return best, why


def operating_point(best: dict, flags: list[str], slo: SLO, objective: str, settings: dict) -> dict:
    """The server flags of the chosen point (as `--flag value` pairs; switches map to true) and
    what it was tuned for."""
    pairs: dict[str, object] = {}
    i = 0
    while i < len(flags):
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            pairs[flags[i]] = flags[i + 1]
            i += 2
        else:
            pairs[flags[i]] = True
            i += 1
    return {"flags": pairs, "tp": settings["tp"], "slo": slo.__dict__, "slo_ttft_s": slo.ttft_p95_s,
            "objective": objective, "candidate": best["candidate"], "batch_size": best["batch_size"],
            "measured": {k: best[k] for k in ("out_tok_per_s", "req_per_s", "ttft_p95_ms", "tpot_p95_ms",
                                              "tok_per_s_per_user_p95", "e2e_p95_ms", "peak_kv_usage")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_all(out: Path, points: list[dict], runs: list[dict], best: dict | None, why: str, slo: SLO,
              objective: str, settings: dict, stops: dict, best_flags: list[str] | None) -> None:
    report = {"settings": settings, "slo": slo.__dict__, "objective": objective, "chosen": best, "why": why,
              "stopped": stops, "points": points, "runs": runs}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    with open(out / "points.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for p in points:
            w.writerow({**p, "misses": "; ".join(p["misses"])})
    if best is not None and best_flags is not None:
        (out / "operating_point.json").write_text(
            json.dumps(operating_point(best, best_flags, slo, objective, settings), indent=1))
    plots = plot(out, points, best, slo)
    (out / "report.md").write_text(markdown(points, best, why, slo, objective, settings, stops, plots))


def markdown(points, best, why, slo: SLO, objective, settings, stops, plots) -> str:
    lines = ["# Operating-point profile", "",
             f"Model `{settings['model']}`, TP {settings['tp']}, {settings['protocol']} load; workload "
             f"{json.dumps(settings['workload'])}; {settings['repeats']} measured run(s) per point after a warm-up.", "",
             f"SLO: {slo.describe()}; objective: {objective}.", "",
             f"**Chosen:** {why}" if best else f"**No operating point:** {why}", "",
             "| candidate | batch | out tok/s (min-max) | tok/s per user p95 | TTFT p50 / p95 / p99 ms | "
             "TPOT p95 ms | e2e p95 ms | goodput req/s | preempt | peak KV | SLO |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        verdict = "meets" if p["meets_slo"] else ("; ".join(p["misses"]) or "memory")
        mark = " **(chosen)**" if best is not None and p is best else ""
        lines.append(
            f"| {p['candidate']} | {p['batch_size']}{mark} | {p['out_tok_per_s']:.1f} ({p['out_tok_per_s_min']:.1f}-"
            f"{p['out_tok_per_s_max']:.1f}) | {p['tok_per_s_per_user_p95']:.1f} | {p['ttft_p50_ms']:.0f} / "
            f"{p['ttft_p95_ms']:.0f} / {p['ttft_p99_ms']:.0f} | {p['tpot_p95_ms']:.1f} | {p['e2e_p95_ms']:.0f} | "
            f"{p['goodput_req_per_s']:.2f} | {p['preemptions']:.0f} | {p['peak_kv_usage']:.2f} | {verdict} |")
    lines += ["", "Sweeps ended: " + "; ".join(f"{k}: {v}" for k, v in stops.items()), ""]
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def plot(out: Path, points: list[dict], best: dict | None, slo: SLO) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_candidate: dict[str, list[dict]] = {}
    for p in points:
        by_candidate.setdefault(p["candidate"], []).append(p)
    names = []

    def finish(fig, ax, name, title):
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)

    def tradeoff(x_of, xlabel, line, line_label, name, title):
        """Output throughput against one latency figure, each point labelled with its batch."""
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for cand, ps in by_candidate.items():
            ps = sorted(ps, key=lambda p: p["batch_size"])
            xs, ys = [x_of(p) for p in ps], [p["out_tok_per_s"] for p in ps]
            ax.plot(xs, ys, "o-", label=cand)
            for p, x, y in zip(ps, xs, ys):
                ax.annotate(f"b{p['batch_size']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if line is not None:
            ax.axvline(line, color="red", ls="--", label=line_label)
        if best is not None:
            ax.plot([x_of(best)], [best["out_tok_per_s"]], "*", ms=18, color="gold", mec="black",
                    label=f"chosen: batch {best['batch_size']}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("output tokens/s (all users)")
        finish(fig, ax, name, title)

    tradeoff(lambda p: p["ttft_p95_ms"] / 1000, "p95 time to first token (s)", slo.ttft_p95_s,
             f"SLO p95 TTFT {slo.ttft_p95_s} s", "throughput_vs_ttft.png", "Throughput against latency, by batch size")
    tradeoff(lambda p: p["tok_per_s_per_user_p95"], "tokens/s per user (at the p95 TPOT)", slo.min_tokens_per_user,
             f"SLO {slo.min_tokens_per_user} tok/s/user", "throughput_vs_per_user.png",
             "Total throughput against each user's speed")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cand, ps in by_candidate.items():
        ps = sorted(ps, key=lambda p: p["batch_size"])
        bs = [p["batch_size"] for p in ps]
        for key, style in (("ttft_p50_ms", ":"), ("ttft_p95_ms", "-"), ("ttft_p99_ms", "--"), ("tpot_p95_ms", "-."),
                           ("e2e_p95_ms", "-")):
            ax.plot(bs, [p[key] / 1000 for p in ps], style, marker="o", ms=3,
                    label=f"{cand} {key[:-3].replace('_', ' ')}")
    if slo.ttft_p95_s is not None:
        ax.axhline(slo.ttft_p95_s, color="red", ls="--", label="SLO p95 TTFT")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (--max-num-seqs = concurrent clients)")
    ax.set_ylabel("seconds")
    finish(fig, ax, "latency_vs_batch.png", "Latency percentiles against batch size")
    return names
