"""babygpt_bench: the side-by-side benchmark (`bench`), its trace profiler (`profile`) and the GPU
parity check (`gpu_check`): tools that measure both backends, apart from the parity tests."""
