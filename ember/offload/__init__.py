"""Where weights live and when they move: the weight store, caches, prefetching, prediction."""
