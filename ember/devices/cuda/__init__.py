"""The CUDA device's kernels (numba.cuda, `kernels`); the device that runs a model with them is
not in ember yet: `device="cuda"` is a clear error."""
