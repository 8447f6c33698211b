"""The decode loop on the real default model: what a user of `lowbit generate` gets.

Marked slow (the model loads from the cache; the first run downloads it); the chat answer is in
the CI ``smoke`` subset.
"""

import json
import subprocess
import sys

import pytest
import torch

from lowbit import api
from lowbit.data.corpora import load_corpus
from lowbit.models.kernels import use_kernels
from lowbit.runtime import Runtime

pytestmark = pytest.mark.slow


@pytest.mark.smoke
def test_generate_answers_a_chat_question():
    question = "What is the capital of France?"
    cmd = [sys.executable, "-m", "lowbit.cli", "-q", "generate", "smollm2-135m", "--chat",
           "--prompt", question, "--max-new-tokens", "24", "--json"]  # fmt: skip
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    assert "Paris" in out["text"] and out["finish"] == "stop" and out["loop"] == "compact"


def _forced_agreement(runtime: Runtime, prompt: list[int], ref: list[int]) -> float:
    forward = runtime.forward_for(len(prompt) + len(ref))
    cache = forward.new_cache(1, len(prompt) + len(ref))
    with torch.inference_mode():
        logits, hits = forward(torch.tensor([prompt]), cache), 0
        for tok in ref:
            hits += int(logits.argmax(-1).item() == tok)
            logits = forward(torch.tensor([[tok]]), cache)
    return hits / len(ref)


@pytest.mark.parametrize("recipe", [None, "w4-sym-g32"])
def test_compact_loop_decodes_what_the_transformers_loop_decodes(recipe):
    """128 greedy tokens after a wiki prompt: identical in float; on W4 kernels (whose int8
    activation rounding can flip on float-rounding differences) the compact loop picks the
    transformers loop's next token at >= 98% of the steps when fed its tokens."""
    src = api.load_model("smollm2-135m")
    model = src.model
    if recipe:
        api.quantize(model, recipe, progress=False)
        use_kernels(model)
    prompt = src.tokenizer(load_corpus("wiki").text[:2000])["input_ids"][:256]
    ref = Runtime(model, compact=False).generate([prompt], 128).tokens[0]
    ours = Runtime(model).generate([prompt], 128)
    assert ours.path == "compact"
    if recipe is None:
        assert ours.tokens[0] == ref
    else:
        assert _forced_agreement(Runtime(model), prompt, ref) >= 0.98
