"""Low-bit matmul kernels, each beside its plain-PyTorch reference (the test oracle).

- :mod:`lowbit.kernels.affine`: 4/8-bit group-wise weights x float inputs, or int8 inputs per
  block of 32 (C++ AVX2 / AVX-512 VNNI op);
- :mod:`lowbit.kernels.int8`: int8 weights x int8 per-token inputs (oneDNN's int8 matmul or
  lowbit's C++ op);
- :mod:`lowbit.kernels.build`: builds and loads the C++ op once per machine, or reports that
  the references will be used.
"""
