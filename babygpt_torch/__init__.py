"""babyGPT in PyTorch: the stateful mirror of babygpt_jax."""

from babygpt.run import let_openmp_threads_sleep

let_openmp_threads_sleep()  # before any module here imports torch: libgomp reads it once, on load
