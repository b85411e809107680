"""Fault injection for the reliability tests, loaded by every rank of a test server through
PYTHONPATH (never installed, never imported by tpserve).

TPSERVE_TEST_FAULT="rank=R;phase=P;action=A;arm=FILE" makes rank R, once FILE exists, act on the
first step of phase P that it runs:

- phase: prefill (a plan computes a chunk of a prompt), decode (every sequence computes one
  token), spec (a plan verifies speculative tokens), any (the first step at all: the drain rows
  arm it after SIGTERM);
- action: kill (SIGKILL itself), stop (SIGSTOP itself), raise (a RuntimeError inside the forward),
  nan (rank 0 only: the first sampled logit row of that step turns NaN, once).

Before acting it writes the wall-clock time to FILE.fired, from which the tests measure detection.
"""

import os

_SPEC = os.environ.get("TPSERVE_TEST_FAULT")


def _matches(plan, phase):
    works = plan.seqs
    if not works:
        return False
    if phase == "any":
        return True
    if phase == "spec":
        return any(w.num_logits > 1 for w in works)
    if phase == "prefill":
        return any(len(w.token_ids) > 1 and w.num_logits == 1 for w in works)
    if phase == "decode":
        return all(len(w.token_ids) == 1 for w in works)
    raise ValueError(f"unknown fault phase {phase!r}")


def _install(spec):
    import signal
    import time

    cfg = dict(item.split("=", 1) for item in spec.split(";"))
    if int(os.environ.get("RANK", "0")) != int(cfg["rank"]):
        return
    from tpserve.engine.model_runner import ModelRunner

    execute, arm, state = ModelRunner.execute, cfg["arm"], {"fired": False}

    def faulty_execute(self, plan):
        if state["fired"] or not os.path.exists(arm) or not _matches(plan, cfg["phase"]):
            return execute(self, plan)
        state["fired"] = True
        with open(arm + ".fired", "w") as f:
            f.write(repr(time.time()))
        action = cfg["action"]
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action == "raise":
            raise RuntimeError(f"injected fault in the forward ({cfg['phase']})")
        elif action == "nan":
            logits = execute(self, plan).clone()  # (an inference tensor cannot be written in place)
            logits[0] = float("nan")
            return logits
        return execute(self, plan)

    ModelRunner.execute = faulty_execute


if _SPEC:
    _install(_SPEC)
