"""Bandwidth and energy counters, with a fake powercap tree for RAPL."""

import os

import torch

from lowbit.eval import machine


def fake_rapl(root, values, max_range=1000):
    for i, v in enumerate(values):
        d = root / f"intel-rapl:{i}"
        d.mkdir(parents=True)
        (d / "energy_uj").write_text(str(v))
        (d / "max_energy_range_uj").write_text(str(max_range))
        sub = root / f"intel-rapl:{i}:0"  # a subdomain: counted inside its package, never twice
        sub.mkdir()
        (sub / "energy_uj").write_text("5")
    return [root / f"intel-rapl:{i}" for i in range(len(values))]


def test_rapl_energy_sums_packages_and_handles_wraparound(tmp_path):
    domains = fake_rapl(tmp_path, [100, 900])
    meter = machine.EnergyMeter("cpu", tmp_path)
    assert meter.source == "rapl" and len(meter.domains) == 2
    meter.start()
    (domains[0] / "energy_uj").write_text("400")  # +300 uJ
    (domains[1] / "energy_uj").write_text("100")  # wrapped: +200 uJ with a range of 1000
    assert abs(meter.stop() - 500e-6) < 1e-12


def test_no_counters_means_none(tmp_path):
    meter = machine.EnergyMeter("cpu", tmp_path / "absent")
    assert meter.source is None
    meter.start()
    assert meter.stop() is None


def test_bandwidth_is_measured_and_plausible():
    gbs = machine.memory_bandwidth_gbs(megabytes=64, repeats=2)
    assert 0.1 < gbs < 2000


def test_thread_settings_are_reported():
    facts = machine.thread_settings()
    assert facts["torch_threads"] == torch.get_num_threads()
    assert "omp_wait_policy" in facts
    assert facts["lowbit_spin_us"] == os.environ.get("LOWBIT_SPIN_US", "1000")
    assert facts["decode_threads"] in ("spin pool", "openmp", "reference")
    assert facts["kernels"] in ("avx512-vnni", "avx2+avx-vnni", "avx2", "reference")
    # the multi-row 4-bit form: the ISA's own, or AVX2's where it ran faster on an AVX-512 CPU
    assert facts["kernel_rows"] in (facts["kernels"], "avx2")
