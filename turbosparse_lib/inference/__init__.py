"""Decoding on the CPU: Numba kernels (``kernels``, ``attention``), the decode engine (``engine``),
mask providers (``masks``) and thread control (``threads``)."""
