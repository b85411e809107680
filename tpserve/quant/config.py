"""`quantization_config` of an HF `config.json`, parsed and validated.

Three checkpoint formats are understood (`quant_method` selects), all served by the W8A16 / W4A16
kernels of `tpserve.ops` after conversion at load time (see tpserve.quant.formats):

    tpserve  {"quant_method": "tpserve", "bits": 8 | 4, "group_size": G, "sym": bool}
             tensors already in the kernel layouts (written by `python -m tpserve.quantize`).
    gptq     {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": bool, "sym": bool,
              "checkpoint_format": "gptq" | "gptq_v2"}   (AutoGPTQ / GPTQModel)
    awq      {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": true, "version": "gemm"}

Limits (ConfigError names the value and the limit): int4 group sizes must be positive multiples of
16 (the W4A16 kernel's K tile); per-channel int4 (group_size -1) is not supported; int8 exists only
in the tpserve format and is per output channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpserve.errors import ConfigError

METHODS = ("tpserve", "gptq", "awq")
GPTQ_FORMATS = ("gptq", "gptq_v2")
GROUP_MULTIPLE = 16  # the W4A16 kernel tiles K in blocks that must divide the group


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "tpserve" | "gptq" | "awq"
    bits: int  # 8 (tpserve only) or 4
    group_size: int  # rows of K sharing one scale/zero (int4); 0 for per-channel int8
    sym: bool = True
    desc_act: bool = False  # GPTQ act-order: rows of K belong to groups through g_idx
    checkpoint_format: str = "gptq"  # GPTQ: "gptq" stores zero - 1, "gptq_v2" the zero itself

    @property
    def name(self) -> str:
        """Short label shown by GetModelInfo: int8, int4-g128, gptq-4bit-g128, awq-4bit-g128."""
        if self.method == "tpserve":
            return "int8" if self.bits == 8 else f"int4-g{self.group_size}"
        return f"{self.method}-{self.bits}bit-g{self.group_size}"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "QuantConfig | None":
        """None when `hf` (a whole config.json) has no quantization_config."""
        qc = hf.get("quantization_config")
        if qc is None:
            return None
        if not isinstance(qc, dict):
            raise ConfigError(f"quantization_config must be an object, got {qc!r}")
        method = str(qc.get("quant_method", "")).lower()
        if method not in METHODS:
            raise ConfigError(
                f"quantization_config.quant_method={qc.get('quant_method')!r} is not supported; "
                f"supported: {list(METHODS)}")
        bits = qc.get("bits", qc.get("w_bit"))
        allowed_bits = (8, 4) if method == "tpserve" else (4,)
        if bits not in allowed_bits:
            raise ConfigError(f"{method} bits={bits!r} is not supported; supported: {list(allowed_bits)}")
        group = qc.get("group_size", qc.get("q_group_size"))
        if bits == 8:
            if group not in (None, -1, 0):
                raise ConfigError(f"int8 is per output channel: group_size={group!r} must be omitted or -1")
            return cls(method, 8, 0, sym=True)
        _check_group(method, group)
        if method == "tpserve":
            return cls(method, 4, int(group), sym=bool(qc.get("sym", False)))
        if method == "gptq":
            return cls._gptq(qc, int(group))
        return cls._awq(qc, int(group))

    @classmethod
    def _gptq(cls, qc: dict, group: int) -> "QuantConfig":
        fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        if fmt not in GPTQ_FORMATS:
            raise ConfigError(f"gptq checkpoint_format={fmt!r} is not supported; supported: {list(GPTQ_FORMATS)}")
        if qc.get("lm_head"):
            raise ConfigError("gptq lm_head=true (a quantised LM head) is not supported; only linear layers "
                              "inside the decoder layers may be quantised")
        if qc.get("dynamic"):
            raise ConfigError("gptq 'dynamic' per-module overrides are not supported; one bits/group_size "
                              "must hold for every layer")
        return cls("gptq", 4, group, sym=bool(qc.get("sym", True)), desc_act=bool(qc.get("desc_act", False)),
                   checkpoint_format=fmt)

    @classmethod
    def _awq(cls, qc: dict, group: int) -> "QuantConfig":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ConfigError(f"awq version={qc.get('version')!r} is not supported; supported: ['gemm']")
        if not qc.get("zero_point", True):
            raise ConfigError("awq zero_point=false is not supported; supported: zero_point=true")
        if qc.get("modules_to_not_convert"):
            raise ConfigError(f"awq modules_to_not_convert={qc['modules_to_not_convert']!r} is not supported: "
                              "every q/k/v/o/gate/up/down projection must be quantised")
        return cls("awq", 4, group, sym=False)

    # --- tensor-parallel limits -----------------------------------------------------------------
    def tp_problem(self, hidden_size: int, attn_size: int, intermediate_size: int, tp_size: int) -> str | None:
        """Why a `tp_size`-way split of this checkpoint is impossible, or None when it is fine.
        The K sizes (input features) are the model's: hidden_size for q/k/v/gate/up_proj,
        attn_size (heads x head_dim) for o_proj, intermediate_size for down_proj.

        K must be a multiple of 8 (int32 packs); it may end in a partial group where it is not
        split (column-parallel layers, TP = 1). Row-parallel layers (o_proj, down_proj) give each
        rank K / tp rows, which must hold whole groups, or, with GPTQ act-order (rows padded per
        group at load), whole 8-row packs."""
        if self.bits == 8:
            return None
        g = self.group_size
        row = {"o_proj": attn_size, "down_proj": intermediate_size}
        col = {"q/k/v/gate/up_proj": hidden_size}
        for name, k in {**col, **row}.items():
            if k % 8:
                return f"{name} has K={k} input features, not a multiple of 8 (the int32 packing)"
        if tp_size == 1:
            return None  # an unsplit K may end in a partial group
        for name, k in row.items():
            if k % tp_size:
                return f"{name} K={k} is not divisible by tp_size={tp_size}"
            per_rank = k // tp_size
            unit = 8 if self.desc_act else g
            what = "the 8-row int32 packing" if self.desc_act else f"a quantisation group of {g} rows"
            if per_rank % unit:
                return (f"{name} is row-parallel: K={k} split {tp_size} ways gives {per_rank} rows per rank, "
                        f"not a multiple of {unit}, so a rank's shard would cut {what}")
        return None


def _check_group(method: str, group) -> None:
    if group == -1:
        raise ConfigError(f"{method} group_size=-1 (one group per output channel) is not supported; "
                          f"use a group size that is a positive multiple of {GROUP_MULTIPLE}, e.g. 128")
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0 or group % GROUP_MULTIPLE:
        raise ConfigError(f"{method} group_size={group!r} is not supported; it must be a positive multiple of "
                          f"{GROUP_MULTIPLE} (e.g. 32, 64, 128)")
