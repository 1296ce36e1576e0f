"""Section 7 on this machine: timing rules (``timing``), bandwidth, kernel benchmarks (``kernels``),
end-to-end decoding against llama.cpp (``decoding``, ``llamacpp``), bytes per token
(``bytes_model``) and projections onto the paper's machines (``projections``)."""
