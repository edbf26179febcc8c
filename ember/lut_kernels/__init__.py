"""The CPU kernels: matrix-vector and small-batch matrix products on GGUF weights, as LLVM IR
emitted with llvmlite and called from numba code (``nogil``, ``cache=True``) through runtime
addresses, with a plain numba path for hosts without an IR kernel path. Each weight type is
repacked once into its kernel's layout (kept in the pack cache); every fast path has a NumPy
oracle that the tests hold it to. Measured history: docs/kernels.md.

Modules:

- ``ops``: the entry the runtime uses: ``quant_matrix`` picks a type's kernel and layout, ``matmul``.
- ``codegen``: public IR/JIT helpers: host kernel paths, IR text fragments, MCJIT compile with an
  on-disk object cache, calls from numba through an address.
- ``pack``: the T-MAC bit-plane layout of Q4_0/Q4_1 and the packing helpers the layouts share.
- ``tmac_ir``, ``tmac``: the table-lookup (T-MAC) kernels for Q4_0/Q4_1: their IR; tables, matvec, oracle.
- ``q8``: int8-activation matvec for Q8_0, Q5_0, Q5_1 (and TQ1_0/TQ2_0 as exact int8).
- ``kquant``: the K-quant (Q2_K..Q6_K) matvec and k-row matmul: compile, dispatch, the calls; with
  ``kquant_layout`` (packing), ``kquant_acts`` (activation format), ``kquant_ir`` (kernel IR),
  ``kquant_portable`` (plain numba path), ``kquant_reference`` (NumPy oracles).
- ``f16``: F16/BF16 rows as in the file, widened in registers.
- ``fused``: matrix descriptors, activation scratch and a spin barrier for fused multi-threaded steps.
- ``split``: a worker team and row splitting for multi-threaded calls.
- ``pack_cache``: packed matrices on disk, memory-mapped on the next load.
"""
