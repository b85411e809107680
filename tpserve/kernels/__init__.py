"""Triton kernels, one op per module. Nothing here is imported eagerly, so the package imports where Triton
is absent; import a submodule (which imports triton) only to use its kernel. Kernels take tensors
and sizes only: nothing here imports the rest of tpserve."""
