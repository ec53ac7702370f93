"""babygpt_bench: the side-by-side benchmark (`bench`), its trace profiler (`profile`), the GPU
parity check (`gpu_check`) and the decode kernels' launch-setting sweep (`kernel_sweep`): tools
that measure both backends, apart from the parity tests."""
