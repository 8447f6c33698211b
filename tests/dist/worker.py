"""One rank of a torchrun job in the distributed tests: quantize a tiny folder with each recipe
(streamed, into OUT/NAME) and score it, as the single-process tests do.

    torchrun --nproc-per-node 2 tests/dist/worker.py FOLDER OUT RECIPES.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lowbit import api
from lowbit.calibration import CalibrationSet
from lowbit.calibration.group import Group, init_from_env, shutdown
from lowbit.eval import score_models
from lowbit.recipes import Recipe


def calibration(vocab: int) -> CalibrationSet:
    """The windows every test run uses (20 windows: batches of 8, 8 and 4)."""
    windows = torch.randint(0, vocab, (20, 16), generator=torch.Generator().manual_seed(1))
    return CalibrationSet("test", 20, 16, 0, windows)


def run(folder: Path, out: Path, recipes: dict[str, dict]) -> dict[str, list[float]]:
    """Quantize with every recipe; the scores of each result on held-out windows."""
    model = api.load_model(str(folder))
    vocab = model.model.config.vocab_size
    held_out = torch.randint(0, vocab, (5, 24), generator=torch.Generator().manual_seed(2))
    scores = {}
    for name, body in recipes.items():
        recipe = Recipe.from_dict(body)
        data = calibration(vocab) if recipe.needs_calibration else None
        target = out / name
        api.quantize_to(str(folder), recipe, target, data, overwrite=True, progress=False)
        quantized = api.load(target, kernels=False).model
        got, _ = score_models({"q": quantized}, held_out, ref=model.model, progress=False)
        scores[name] = [got["q"].ppl, got["q"].mean_kl, got["q"].top1_rate]
    in_memory(folder, out / "memory", vocab)
    return scores


def in_memory(folder: Path, out: Path, vocab: int) -> None:
    """GPTQ through ``lowbit.quantize`` on a model held in memory by every rank."""
    src = api.load_model(str(folder))
    report = api.quantize(src.model, "w3-gptq-g32", calibration(vocab), progress=False)
    if Group.current().main:
        api.save(src.model, out, report, source=src)


if __name__ == "__main__":
    group = init_from_env()
    folder, out, recipes = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    result = run(folder, out, recipes)
    if group.main:
        (out / "scores.json").write_text(json.dumps(result))
    shutdown()
