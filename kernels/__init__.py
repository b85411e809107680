"""Triton kernels, one op per module. Nothing here is imported eagerly: `import kernels` must work
where Triton is absent; import a submodule (which imports triton) only to use its kernel."""
