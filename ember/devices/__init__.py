"""Where the math runs, behind one small protocol (`base.Device`): the CPU today (`cpu`), GPU
attention and whole small models on OpenCL / CUDA to come. A device runs a model's layers over a
KV cache it owns; the model's definition (`runtime.model`) stays device-independent."""
