"""Load this rank's slices of an HF safetensors checkpoint into a built model.

Every checkpoint tensor is matched to a parameter (and fused shard) before any data is read, so a
missing or unexpected tensor is reported by name up front. Optional names (a model's
`optional_checkpoint_names`, e.g. GPTQ's all-zero biases) may be present or absent; when present
they are loaded, and their loaders check them. Each parameter's `weight_loader` then
reads only this rank's slice through safetensors' lazy `get_slice`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from tpserve.layers.sources import SafetensorsSource, default_weight_loader

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded into this model; the message names the tensors or files."""


def find_checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return {name: model_dir / f for name, f in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{model_dir} holds only pickle checkpoints {pickles}; tpserve loads safetensors only "
                "(pickle files can run code when loaded). Convert them first, e.g. "
                "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`."
            )
        raise CheckpointError(f"no *.safetensors checkpoint found in {model_dir}")
    names: dict[str, Path] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                names[name] = path
    return names


def _plan(model: nn.Module, tensor_files: dict[str, Path]) -> dict[str, tuple[str, object]]:
    expected = model.checkpoint_names()
    optional = model.optional_checkpoint_names() if hasattr(model, "optional_checkpoint_names") else {}
    unexpected = sorted(n for n in tensor_files
                        if n not in expected and n not in optional and not model.ignorable(n))
    missing = sorted(n for n in expected if n not in tensor_files)
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:20]}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:20]}")
    if problems:
        raise CheckpointError("checkpoint does not match the model config: " + "; ".join(problems))
    return {n: expected.get(n) or optional[n] for n in tensor_files if n in expected or n in optional}


def load_weights(model: nn.Module, model_dir: str | Path, show_progress: bool = True) -> None:
    """Fill every parameter of `model` (already built for this rank) from `model_dir`.

    A target "<module>.<suffix>" goes to the module's `load_checkpoint_tensor` when it has one
    (linear layers, whose quant method decides what the suffixes are), else to the parameter's
    `weight_loader`. Every file stays open until all tensors are in, because a quantised layer may
    convert a projection only once all of its tensors (possibly in different files) have arrived;
    `finish_loading` then lets each module check that nothing is left half-loaded."""
    tensor_files = find_checkpoint_files(model_dir)
    plan = _plan(model, tensor_files)
    params = dict(model.named_parameters(remove_duplicate=True))
    modules = dict(model.named_modules())
    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(tensor_files[name], []).append(name)
    bar = tqdm(total=len(plan), desc="loading weights", unit="tensor", disable=not show_progress)
    with contextlib.ExitStack() as stack:
        for path, names in by_file.items():
            f = stack.enter_context(safe_open(path, framework="pt"))
            for name in names:
                target, shard_id = plan[name]
                source = SafetensorsSource(name, f.get_slice(name))
                module_name, _, suffix = target.rpartition(".")
                module = modules.get(module_name)
                if module is not None and hasattr(module, "load_checkpoint_tensor"):
                    module.load_checkpoint_tensor(suffix, source, shard_id)
                else:
                    param = params[target]
                    getattr(param, "weight_loader", default_weight_loader)(param, source, shard_id)
                bar.update(1)
        for module in modules.values():
            if hasattr(module, "finish_loading"):
                module.finish_loading()
    bar.close()
