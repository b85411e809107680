"""The contiguous-rows attention path against the paged reference, over many steps of sequences
joining, leaving, coming back after an absence, prefilling in chunks, decoding, verifying
speculative tokens and rolling them back, with rows re-laid out and grown along the way, and with
a sequence whose K/V are all NaN leaving its blocks and row to others."""

from __future__ import annotations

import random

import pytest
import torch

from tpserve.ops import kv_rows
from tpserve.ops.attention import AttentionMetadata, paged_attention_ref, write_kv_cache
from tpserve.ops.kv_rows import KVRows, rows_attention, write_rows

BLOCK, NUM_BLOCKS, HKV, H, D, LAYERS = 4, 512, 2, 4, 8, 2


def _meta(works, tables):
    slots, starts, lens = [], [0], []
    for (s, c, n) in works:
        slots += [tables[s][p // BLOCK] * BLOCK + p % BLOCK for p in range(c, c + n)]
        starts.append(starts[-1] + n)
        lens.append(c + n)
    width = max(len(tables[s]) for s, _, _ in works)
    table_t = torch.zeros(len(works), width, dtype=torch.int32)
    for i, (s, _, _) in enumerate(works):
        table_t[i, : len(tables[s])] = torch.tensor(tables[s], dtype=torch.int32)
    return AttentionMetadata(torch.tensor(slots), torch.tensor(starts, dtype=torch.int32),
                             torch.tensor(lens, dtype=torch.int32), table_t, starts, lens,
                             max(b - a for a, b in zip(starts, starts[1:])), max(lens))


CASES = [(seed, window, budget, torch.float32) for seed in range(6) for window in (None, 7) for budget in (None, 8 * 64)]
CASES += [(seed, window, None, torch.bfloat16) for seed in range(2) for window in (None, 7)]


@pytest.mark.parametrize("seed,sliding_window,budget,dtype", CASES)
def test_rows_match_the_paged_reference(seed, sliding_window, budget, dtype, monkeypatch):
    """With a budget (in row positions), steps needing more attend the blocks and every row is
    released; the next steps that fit refill them. In bfloat16 the rows take the fused call (its
    scores accumulate in float32, like the reference's)."""
    monkeypatch.setattr(kv_rows, "MIN_ROWS", 2)  # grow rows and capacity several times
    monkeypatch.setattr(kv_rows, "MIN_CAPACITY", 8)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    paged = [(torch.zeros(NUM_BLOCKS, BLOCK, HKV, D, dtype=dtype), torch.zeros(NUM_BLOCKS, BLOCK, HKV, D, dtype=dtype))
             for _ in range(LAYERS)]
    rows = KVRows(LAYERS, HKV, D, max_rows=12, max_len=200, dtype=dtype, device=torch.device("cpu"),
                  budget_bytes=None if budget is None else budget * 2 * LAYERS * HKV * D * dtype.itemsize)
    tolerance = 1e-5 if dtype is torch.float32 else 2e-2
    paged_steps = rows_steps = released = 0
    free_blocks = list(range(NUM_BLOCKS))
    rng.shuffle(free_blocks)
    seqs: dict[int, dict] = {}  # id -> {"computed", "target", "table", "poison"}
    next_id, checked, relayouts = 0, 0, 0
    for step in range(60):
        while len(seqs) < 12 and rng.random() < 0.5:  # arrivals
            seqs[next_id] = {"computed": 0, "target": rng.randint(5, 150), "table": [], "poison": next_id % 7 == 3}
            next_id += 1
        present = [s for s in seqs if rng.random() < 0.85]  # some sit a step out (their rows go)
        if not present:
            continue
        works = []
        for s in present:
            q = seqs[s]
            if q["computed"] < 20 and rng.random() < 0.7:
                n = rng.randint(17, 30)  # a prefill chunk (long query)
            else:
                n = rng.choice([1, 1, 1, 4])  # a decode, or verifying 3 speculative tokens
            n = min(n, 190 - q["computed"])
            if n < 1:
                continue
            need = -(-(q["computed"] + n) // BLOCK)
            while len(q["table"]) < need:
                q["table"].append(free_blocks.pop())
            works.append((s, q["computed"], n))
        if not works:
            continue
        tables = {s: seqs[s]["table"] for s, _, _ in works}
        meta_ref = _meta(works, tables)
        meta_rows = _meta(works, tables)
        meta_rows.rows = rows.prepare([w[0] for w in works], [w[1] for w in works], [w[2] for w in works],
                                      [tables[w[0]] for w in works], BLOCK, paged)
        paged_steps += meta_rows.rows is None
        rows_steps += meta_rows.rows is not None
        total = sum(n for _, _, n in works)
        poison_rows = torch.tensor([seqs[s]["poison"] for s, _, n in works for _ in range(n)])
        for layer in range(LAYERS):
            q_t, k, v = (torch.randn(shape).to(dtype) for shape in ((total, H, D), (total, HKV, D), (total, HKV, D)))
            if dtype is torch.bfloat16:  # scores of tens, where bfloat16 accumulation would show
                q_t = q_t * 8
            k[poison_rows], v[poison_rows] = float("nan"), float("nan")
            k_ref, v_ref = paged[layer][0].clone(), paged[layer][1].clone()
            write_kv_cache(k, v, k_ref, v_ref, meta_ref.slot_mapping)
            expected = paged_attention_ref(q_t, k_ref, v_ref, meta_ref, D**-0.5, sliding_window)
            write_kv_cache(k, v, *paged[layer], meta_rows.slot_mapping)
            if meta_rows.rows is None:  # over the budget: what dispatch.attention does then
                got = paged_attention_ref(q_t, *paged[layer], meta_rows, D**-0.5, sliding_window)
            else:
                write_rows(k, v, *rows.layer(layer), meta_rows.rows)
                got = rows_attention(q_t, *rows.layer(layer), meta_rows.rows, D**-0.5, sliding_window)
            torch.testing.assert_close(paged[layer][0], k_ref, rtol=0, atol=0, equal_nan=True)
            clean = ~poison_rows
            assert torch.isfinite(got[clean]).all(), f"step {step}: NaN reached a clean sequence"
            torch.testing.assert_close(got[clean], expected[clean], rtol=tolerance, atol=tolerance)
            checked += int(clean.sum())
        for s, c, n in works:  # advance; a verification keeps a random number of its tokens
            q = seqs[s]
            q["computed"] = c + (rng.randint(1, n) if n == 4 and c >= 20 else n)
            if q["computed"] >= q["target"]:
                free_blocks += q["table"]  # its blocks (NaN ones included) go to later sequences
                del seqs[s]
                rows.release(s)
            elif rng.random() < 0.1 and c + n > q["computed"] + 1:
                # Preempted after a rollback, back with a prefix-cache hit that reaches into the
                # rejected tail: those blocks now hold another request's K/V (the accepted tokens'),
                # not what the row holds; the plan's finished list releases the row.
                hit = rng.randint(q["computed"] + 1, c + n)
                slots = [q["table"][p // BLOCK] * BLOCK + p % BLOCK for p in range(q["computed"], hit)]
                for k_cache, v_cache in paged:
                    k_cache.view(-1, HKV, D)[slots] = torch.randn(len(slots), HKV, D).to(dtype)
                    v_cache.view(-1, HKV, D)[slots] = torch.randn(len(slots), HKV, D).to(dtype)
                q["computed"] = hit
                rows.release(s)
                released += 1
        relayouts = rows.relayouts
    assert checked > 500 and rows_steps > 5 and released > 0 and rows.rows > 2 and rows.capacity > 8
    if budget is None:
        assert relayouts > 0 and paged_steps == 0
    else:
        assert paged_steps > 0 and rows.rows * rows.capacity <= budget
