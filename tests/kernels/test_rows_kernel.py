"""The kernel for inputs of several rows: measured once per machine, recorded, reused."""

import json
import os

import pytest
import torch

from helpers import random_affine
from lowbit.errors import LowbitError
from lowbit.kernels import build, rows_kernel
from lowbit.kernels.affine import affine_linear
from lowbit.kernels.build import native_ops
from lowbit.kernels.int8 import has_avx512_vnni

ENV = rows_kernel.ENV


def _never(choice):
    raise AssertionError("measured again")


def test_the_faster_form_is_chosen_recorded_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    calls = []

    def measure(choice):
        calls.append(choice)
        return {"": 2.0, "avx2": 1.0}[choice]

    assert rows_kernel.choose_rows_kernel(tmp_path, measure) == "avx2"
    assert sorted(set(calls)) == ["", "avx2"] and len(calls) == 14  # alternating rounds
    record = json.loads((tmp_path / rows_kernel.FILE).read_text())
    assert record["machines"][rows_kernel.cpu_key()]["choice"] == "avx2"
    assert os.environ[ENV] == "avx2"  # what the C++ reads
    monkeypatch.delenv(ENV)
    assert rows_kernel.choose_rows_kernel(tmp_path, _never) == "avx2"  # from the record


def test_each_thread_count_and_cpu_has_its_own_record(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    threads = torch.get_num_threads()
    assert f", {threads} threads" in rows_kernel.cpu_key()
    assert rows_kernel.choose_rows_kernel(tmp_path, lambda c: 1.0 if c == "" else 2.0) == ""
    try:
        torch.set_num_threads(threads + 1)
        monkeypatch.delenv(ENV)  # another thread count: measured, and recorded beside the first
        assert rows_kernel.choose_rows_kernel(tmp_path, lambda c: 2.0 if c == "" else 1.0) == "avx2"
    finally:
        torch.set_num_threads(threads)
    machines = json.loads((tmp_path / rows_kernel.FILE).read_text())["machines"]
    assert len(machines) == 2
    monkeypatch.delenv(ENV)
    assert rows_kernel.choose_rows_kernel(tmp_path, _never) == ""  # the first one's, kept


def test_a_record_that_cannot_be_written_leaves_the_choice_for_this_run(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rows_kernel, "write_text_atomic", full_disk)
    assert rows_kernel.choose_rows_kernel(tmp_path, lambda c: 2.0 if c == "" else 1.0) == "avx2"
    assert os.environ[ENV] == "avx2" and not (tmp_path / rows_kernel.FILE).exists()


def test_another_cpus_record_or_a_damaged_one_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    path = tmp_path / rows_kernel.FILE
    key = rows_kernel.cpu_key()
    for text in (json.dumps({"version": 2, "machines": {"some other CPU": {"choice": "avx2"}}}),
                 "{not json", json.dumps({"cpu": key, "choice": "avx2"}),  # (version 1)
                 json.dumps({"version": 2, "machines": {key: {"choice": "sse"}}})):  # fmt: skip
        path.write_text(text)
        monkeypatch.delenv(ENV, raising=False)
        assert rows_kernel.choose_rows_kernel(tmp_path, lambda c: 1.0 if c == "" else 2.0) == ""
        assert json.loads(path.read_text())["machines"][key]["choice"] == ""


def test_a_value_the_user_set_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "avx2")
    assert rows_kernel.choose_rows_kernel(tmp_path, _never) == "avx2"
    assert not (tmp_path / rows_kernel.FILE).exists()
    monkeypatch.setenv(ENV, "avx-2")
    with pytest.raises(LowbitError, match="LOWBIT_KERNEL_ROWS='avx-2': expected avx2"):
        rows_kernel.choose_rows_kernel(tmp_path, _never)
    with pytest.raises(LowbitError, match="LOWBIT_KERNEL_ROWS"):  # on any CPU: at load
        build._load.__wrapped__()  # (the uncached load)


@pytest.mark.skipif(not (native_ops() and has_avx512_vnni()), reason="needs AVX-512 VNNI kernels")
def test_both_forms_agree_and_one_row_keeps_its_kernel(monkeypatch):
    aw = random_affine(96, 256, 32, 8, 3, "f16")  # (8-bit: 4-bit codes take blocks either way)
    g = torch.Generator().manual_seed(1)
    rows, row = torch.randn(8, 256, generator=g), torch.randn(1, 256, generator=g)
    out = {}
    for choice in rows_kernel.CHOICES:
        monkeypatch.setenv(ENV, choice)
        out[choice] = (affine_linear(rows, aw), affine_linear(row, aw))
    assert torch.allclose(out[""][0], out["avx2"][0], rtol=1e-5, atol=1e-5)
    assert not torch.equal(out[""][0], out["avx2"][0])  # two kernels ran (other float sums)
    assert torch.equal(out[""][1], out["avx2"][1])  # one row: the AVX-512 kernel either way
