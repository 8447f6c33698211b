import pytest

from lowbit import api
from lowbit.eval import model_size
from lowbit.eval.inspection import inspect_folder, render_inspection


def test_sizes_in_memory_and_on_disk_agree(tiny_folder, tmp_path):
    src = api.load_model(str(tiny_folder))
    fp = model_size(src.model)
    assert fp.quantized_weights == 0
    report = api.quantize(src.model, "w4-rtn-g64", progress=False)
    q = model_size(src.model)
    assert q.bits_per_weight == pytest.approx(4.5)
    assert q.total_bytes < fp.total_bytes
    info = inspect_folder(api.save(src.model, tmp_path / "q", report, source=src))
    assert info["bits_per_weight"] == pytest.approx(4.5)
    assert info["quantized_bytes"] == q.quantized_bytes
    assert info["quantized_layers"] == len(report.layers)
    assert "int4-asym-g64" in render_inspection(info)


def test_models_on_kernels_count_their_quantized_layers(tiny_folder, tmp_path):
    from lowbit import api

    src = api.load_model(str(tiny_folder))
    report = api.quantize(src.model, "w4-rtn-g64", progress=False)
    folder = api.save(src.model, tmp_path / "q", report, source=src)
    ref, fast = api.load(folder, kernels=False).model, api.load(folder).model
    a, b = model_size(ref), model_size(fast)
    assert a.quantized_weights == b.quantized_weights > 0
    assert a.bits_per_weight == 4.5
    assert b.bits_per_weight == 4.5  # the kernel keeps the saved float16 scales and offsets
    assert a.float_bytes == b.float_bytes
