"""Running a (quantized) causal LM as users do: the decode loop, its KV cache, sampling.

- :mod:`lowbit.runtime.generate`: :class:`Runtime`, prefill + one token per step, streaming;
- :mod:`lowbit.runtime.llama`: a compact forward for Llama-like families over a static cache;
- :mod:`lowbit.runtime.hf_forward`: the model's own forward, for every other family;
- :mod:`lowbit.runtime.batch`: continuous batches, rows that join and leave between steps;
- :mod:`lowbit.runtime.kv_cache`, :mod:`lowbit.runtime.sampling`.
"""

from lowbit.runtime.generate import Generation, Runtime
from lowbit.runtime.sampling import Sampling

__all__ = ["Generation", "Runtime", "Sampling"]
