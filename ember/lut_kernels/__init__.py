"""CPU compute: matmul kernels (NumPy reference now; table-lookup kernels through llvmlite later)."""
