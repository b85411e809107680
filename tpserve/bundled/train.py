"""Model definitions, training loops and evaluation for the bundled models.

Everything runs in fp32 on CPU.  Training is bounded by wall-clock time (the
cosine schedule is laid out over the time budget), or by an explicit step
count when exact reproducibility matters more than build time.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from .corpus import BOS_ID, EOS_ID, VOCAB_SIZE


def llama_config(num_layers: int) -> LlamaConfig:
    # 8 query heads split evenly over TP 1/2/4/8; the 2 KV heads split at
    # TP <= 2 and must be replicated by the runtime at TP 4/8 (standard GQA
    # practice).  head_dim is explicit so hidden = 8 * 32 stays unambiguous.
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=num_layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        hidden_act="silu",
        initializer_range=0.02,
    )


def new_model(num_layers: int) -> LlamaForCausalLM:
    model = LlamaForCausalLM(llama_config(num_layers)).float()
    model.config.use_cache = True
    return model


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sample_batch(tokens: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows of ``seq + 1`` tokens (inputs plus shifted labels)."""
    starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(seq + 1)[None, :]
    return tokens[idx].long()


def fixed_windows(tokens: torch.Tensor, seq: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping ``seq + 1`` windows from the start of a token stream."""
    n = min(max_tokens // seq, (tokens.numel() - 1) // seq)
    idx = torch.arange(n)[:, None] * seq + torch.arange(seq + 1)[None, :]
    return tokens[idx].long()


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch]
        logits = model(input_ids=w[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / max(count, 1)


def lr_at(step: int, progress: float, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine to ``floor * peak`` as
    ``progress`` goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(model, loss_fn, tokens, *, minutes: float, steps: int | None, lr: float,
               batch: int, seq: int, seed: int, log_path: Path, eval_windows: torch.Tensor,
               eval_every: int = 50, desc: str = "train") -> dict:
    """Generic AdamW loop; ``loss_fn(model, batch) -> loss`` defines the objective.

    With ``steps`` the cosine schedule runs over that many steps (exactly
    reproducible).  Without it, the schedule runs over the wall-clock budget
    instead: the machine may be shared, and a time-based schedule still ends
    annealed however throughput fluctuates, where a step count calibrated at
    the start would either overrun or be cut off at a high learning rate.
    """
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    budget_s = minutes * 60.0
    warmup = max(1, min(100, steps // 20)) if steps is not None else 30
    model.train()
    log = open(log_path, "w")
    bar = tqdm(desc=desc, total=steps, unit="step", dynamic_ncols=True, mininterval=5)
    t0 = t_warm = time.time()
    step = tokens_seen = 0
    loss_val = float("nan")
    while True:
        x = sample_batch(tokens, batch, seq, gen)
        if steps is not None:
            progress = (step - warmup) / max(1, steps - warmup)
        else:
            progress = (time.time() - t_warm) / max(1e-9, budget_s - (t_warm - t0))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress, lr, warmup)
        loss = loss_fn(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step == warmup:
            t_warm = time.time()
        tokens_seen += batch * seq
        loss_val = loss.item()
        elapsed = time.time() - t0
        rec = {"step": step, "tokens": tokens_seen, "train_loss": round(loss_val, 5),
               "lr": round(opt.param_groups[0]["lr"], 7), "elapsed_s": round(elapsed, 2)}
        done = step >= steps if steps is not None else elapsed >= budget_s
        if step % eval_every == 0 or done:
            rec["heldout_loss"] = round(heldout_loss(model, eval_windows), 5)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
        if done:
            break
    bar.close()
    log.close()
    elapsed = time.time() - t0
    return {"steps": step, "tokens_seen": tokens_seen, "train_seconds": round(elapsed, 1),
            "tokens_per_s": round(tokens_seen / elapsed, 1), "final_train_loss": round(loss_val, 4)}


def lm_loss(model, x):
    logits = model(input_ids=x[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())


def distill_loss_fn(teacher, temperature: float = 1.0, ce_weight: float = 0.1):
    """KL(teacher || student) on full softened logits, plus a little hard CE.

    Matching the full distribution (not just argmax) is what raises the
    draft's acceptance rate in speculative decoding.
    """
    teacher.eval()

    def fn(model, x):
        inp = x[:, :-1]
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=inp).logits.flatten(0, 1) / temperature, -1)
        s_logits = model(input_ids=inp).logits.flatten(0, 1)
        s_logp = F.log_softmax(s_logits / temperature, -1)
        kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * temperature ** 2
        return kl + ce_weight * F.cross_entropy(s_logits, x[:, 1:].flatten())
    return fn


def init_draft_from_target(draft, target) -> None:
    """Seed the draft with the target's embeddings, head, final norm and its
    first and last blocks: the draft then starts in the target's
    representation space, which makes distillation converge much faster."""
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
        draft.lm_head.weight.copy_(target.lm_head.weight)
        draft.model.norm.weight.copy_(target.model.norm.weight)
        src = [0, len(target.model.layers) - 1]
        for d_layer, s in zip(draft.model.layers, src):
            d_layer.load_state_dict(target.model.layers[s].state_dict())


def save_model(model, out_dir: Path) -> None:
    """Save bf16 safetensors + config + generation config (model left fp32)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # A bf16 copy (not just a bf16 state_dict) so config.json records
    # dtype=bfloat16; save_pretrained derives it from the live parameters.
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(out_dir))
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, do_sample=False,
                     max_new_tokens=128).save_pretrained(str(out_dir))


def load_fp32(model_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.no_grad()
def evaluate_pair(target, draft, windows: torch.Tensor, byte_lens: torch.Tensor,
                  batch: int = 16) -> dict:
    """Held-out perplexity (per token and per byte) for both models, and the
    fraction of positions where the draft's argmax equals the target's."""
    nll = {"target": 0.0, "draft": 0.0}
    n_tok, n_bytes, agree = 0, 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch]
        inp, lab = w[:, :-1], w[:, 1:].flatten()
        t_logits = target(input_ids=inp).logits.flatten(0, 1)
        d_logits = draft(input_ids=inp).logits.flatten(0, 1)
        nll["target"] += F.cross_entropy(t_logits, lab, reduction="sum").item()
        nll["draft"] += F.cross_entropy(d_logits, lab, reduction="sum").item()
        agree += (t_logits.argmax(-1) == d_logits.argmax(-1)).sum().item()
        n_tok += lab.numel()
        n_bytes += byte_lens[lab].sum().item()
    out = {"heldout_tokens": n_tok, "heldout_bytes": int(n_bytes),
           "draft_target_greedy_agreement": round(agree / n_tok, 4)}
    for name, s in nll.items():
        out[name] = {"loss_per_token": round(s / n_tok, 4),
                     "ppl_per_token": round(math.exp(s / n_tok), 3),
                     "ppl_per_byte": round(math.exp(s / n_bytes), 4),
                     "bits_per_byte": round(s / n_bytes / math.log(2), 4)}
    return out
