"""Weight-only quantisation: config parsing (config.py, imported by tpserve.config), checkpoint
format conversion (formats.py) and the quantised linear methods (methods.py). Nothing is imported
eagerly, so that tpserve.config can read a quantization_config without loading the layers.
`python -m tpserve.quantize` writes checkpoints."""
