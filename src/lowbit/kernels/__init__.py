"""Low-bit matmul kernels, each beside its plain-PyTorch reference (the test oracle).

- :mod:`lowbit.kernels.affine`: 4/8-bit group-wise weights x float inputs (C++ AVX2 op);
- :mod:`lowbit.kernels.int8`: int8 weights x int8 per-token inputs (oneDNN's int8 matmul or
  lowbit's C++ op);
- :mod:`lowbit.kernels.build`: builds and loads the C++ op once per machine, or reports that
  the references will be used.
"""
