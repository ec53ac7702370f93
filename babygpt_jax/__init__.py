"""babyGPT in JAX/Flax NNX: the functional mirror of babygpt_torch."""
