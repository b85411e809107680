"""Round-to-nearest weight-only quantisation of a float HF checkpoint into tpserve's own format.

    python -m tpserve.quantize --model DIR --method int8|int4 [--group-size 128] [--sym] --output DIR2

Every q/k/v/o/gate/up/down projection weight W [N, K] becomes (tpserve.ops.quant layouts)
    int8: <proj>.qweight int8 [N, K], <proj>.scales fp32 [N]               (symmetric, per channel)
    int4: <proj>.qweight int32 [K // 8, N], <proj>.scales fp32 [K // G, N],
          <proj>.zeros uint8 [K // G, N]                            (asymmetric, or --sym: zero 8)
          (K // G rounds up: when G does not divide K the last group is partial)
Embeddings, the LM head, norms and biases are copied unchanged, in the checkpoint's dtype. The
output holds safetensors (sharded with model.safetensors.index.json above --max-shard-size),
config.json with `quantization_config`, and copies of generation_config.json and the tokenizer
files. Before writing, the group size is checked against every TP size the float model supports;
the TP sizes the checkpoint will load at are printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tpserve.config import ConfigError, ModelConfig
from tpserve.ops.quant import quantize_int4, quantize_int8
from tpserve.quant.config import QuantConfig
from tpserve.weights.loader import find_checkpoint_files

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tpserve.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="float HF checkpoint directory (safetensors)")
    p.add_argument("--method", required=True, choices=["int8", "int4"])
    p.add_argument("--group-size", type=int, default=128, help="int4: input rows per scale/zero (multiple of 16)")
    p.add_argument("--sym", action="store_true", help="int4: symmetric (zero point fixed at 8)")
    p.add_argument("--output", required=True, help="new directory for the quantised checkpoint")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 500MB, 2GB")
    return p.parse_args(argv)


def quant_config_dict(method: str, group_size: int, sym: bool) -> dict:
    if method == "int8":
        return {"quant_method": "tpserve", "bits": 8}
    return {"quant_method": "tpserve", "bits": 4, "group_size": group_size, "sym": sym}


def tp_report(model_config: ModelConfig, quant: QuantConfig) -> tuple[list[int], list[str]]:
    """(TP sizes the checkpoint loads at, one line per TP size the float model allows but it does not)."""
    supported, refused = [], []
    for tp in range(1, model_config.num_attention_heads + 1):
        try:
            model_config.check_tp(tp)
        except ConfigError:
            continue
        problem = model_config.quant_tp_problem(tp, quant)
        if problem is None:
            supported.append(tp)
        else:
            refused.append(f"tp_size={tp}: {problem}")
    return supported, refused


def is_projection_weight(name: str) -> bool:
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and module.rpartition(".")[2] in PROJECTIONS


def quantize_tensor(name: str, w: torch.Tensor, method: str, group_size: int, sym: bool) -> dict[str, torch.Tensor]:
    prefix = name.removesuffix(".weight")
    if method == "int8":
        q, s = quantize_int8(w)
        return {f"{prefix}.qweight": q, f"{prefix}.scales": s}
    k = w.shape[1]
    extra = -k % group_size
    # A partial last group: quantise it padded with zero columns, which change neither its
    # asymmetric range (always widened to include 0) nor its absmax, then drop the padding.
    q, s, z = quantize_int4(torch.nn.functional.pad(w, (0, extra)), group_size, symmetric=sym)
    q = q[: k // 8].contiguous()
    return {f"{prefix}.qweight": q, f"{prefix}.scales": s, f"{prefix}.zeros": z}


class ShardWriter:
    """Writes tensors into files of at most `max_bytes` (a single larger tensor gets its own file),
    then names them model-0000i-of-0000N.safetensors with an index, or model.safetensors alone."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out / f".part-{len(self.files):05d}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            self.files[0][0].rename(self.out / "model.safetensors")
            return n
        weight_map = {}
        for i, (path, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return n


def quantize_checkpoint(model_dir, output_dir, method: str, group_size: int = 128, sym: bool = False,
                        max_shard_size: int = 2 * 10**9, log=print) -> list[int]:
    """Quantise `model_dir` into `output_dir`; returns the TP sizes the result supports."""
    model_dir, out = Path(model_dir), Path(output_dir)
    model_config = ModelConfig.from_dir(model_dir)
    hf = json.loads((model_dir / "config.json").read_text())
    if hf.get("quantization_config"):
        raise ConfigError(f"{model_dir} is already quantised ({model_config.quantization}); quantise a float model")
    qdict = quant_config_dict(method, group_size, sym)
    quant = QuantConfig.from_hf({"quantization_config": qdict})  # validates bits and group size
    supported, refused = tp_report(model_config, quant)
    if 1 not in supported:
        raise ConfigError(f"cannot quantise {model_dir}: " + "; ".join(refused[:1]))
    if out.resolve() == model_dir.resolve():
        raise ConfigError("--output must differ from --model")
    if out.exists() and any(out.glob("*.safetensors")):
        raise ConfigError(f"{out} already holds a checkpoint; choose a new --output directory")
    out.mkdir(parents=True, exist_ok=True)

    files = find_checkpoint_files(model_dir)
    by_file: dict[Path, list[str]] = {}
    for name, path in sorted(files.items()):
        by_file.setdefault(path, []).append(name)
    writer = ShardWriter(out, max_shard_size)
    num_quantised = in_bytes = 0
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                t = f.get_tensor(name)
                in_bytes += t.numel() * t.element_size()
                if is_projection_weight(name):
                    for qname, qt in quantize_tensor(name, t, method, group_size, sym).items():
                        writer.add(qname, qt)
                    num_quantised += 1
                else:
                    writer.add(name, t)
    expected = 7 * model_config.num_hidden_layers
    if num_quantised != expected:
        raise ConfigError(f"found {num_quantised} projection weights in {model_dir}, expected {expected} "
                          f"(7 per layer x {model_config.num_hidden_layers} layers)")
    num_files = writer.close()
    (out / "config.json").write_text(json.dumps({**hf, "quantization_config": qdict}, indent=2) + "\n")
    for fname in TOKENIZER_FILES:
        if (model_dir / fname).is_file():
            shutil.copy(model_dir / fname, out / fname)
    log(f"quantised {num_quantised} projections to {quant.name}: {in_bytes / 2**20:.1f} MiB -> "
        f"{writer.total_bytes / 2**20:.1f} MiB in {num_files} file(s) under {out}")
    log(f"this checkpoint loads at tp sizes {supported}")
    for line in refused:
        log(f"  not at {line}")
    return supported


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        quantize_checkpoint(args.model, args.output, args.method, args.group_size, args.sym,
                            _size(args.max_shard_size))
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
