"""babyGPT in PyTorch: the stateful mirror of babygpt_jax."""
