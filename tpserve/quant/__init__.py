"""Weight-only quantisation: config parsing (config.py), checkpoint format conversion (formats.py)
and the quantised linear methods (methods.py). `python -m tpserve.quantize` writes checkpoints."""

from tpserve.quant.config import QuantConfig, quant_config_of
from tpserve.quant.formats import QuantFormatError
from tpserve.quant.methods import Int4LinearMethod, Int8LinearMethod, get_quant_method, quant_method_for

__all__ = ["Int4LinearMethod", "Int8LinearMethod", "QuantConfig", "QuantFormatError", "get_quant_method",
           "quant_config_of", "quant_method_for"]
