"""The model and the token loop: config, forward pass, KV cache, sampling, generation."""
