import dataclasses
import logging
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.models.arena import HUGE_PAGE, arena, move_into_arena

LINUX_MAPS = pytest.mark.skipif(not Path("/proc/self/maps").is_file(),
                                reason="needs Linux's /proc maps")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Packed:
    codes: torch.Tensor
    scale: torch.Tensor
    rows: int


def _inside(t: torch.Tensor, block_start: int, block_end: int) -> bool:
    return block_start <= t.data_ptr() < block_end


def test_views_ties_parameters_and_dataclass_fields_survive_the_move():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 6))
    model[1].weight = nn.Parameter(model[0].weight.t().contiguous(), requires_grad=False)
    stacked = torch.randn(10, 3)
    model[0].register_buffer("top", stacked[:4])  # views of one storage, at offsets
    model[0].register_buffer("bottom", stacked[4:])
    model[0].transposed = stacked.t()  # a strided view of the same bytes
    model[1].packed = Packed(torch.arange(12, dtype=torch.uint8), torch.randn(3).half(), 3)
    model[1].tied = model[1].weight  # the same parameter twice
    before = {k: v.clone() for k, v in model.state_dict().items()}
    transposed, packed = model[0].transposed.clone(), model[1].packed
    x = torch.randn(2, 6)
    with torch.no_grad():
        ref = model(x)
    move_into_arena(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(model[0].transposed, transposed)
    assert model[0].transposed.stride() == (1, 3)
    assert torch.equal(model[1].packed.codes, packed.codes)
    assert model[1].packed.scale.dtype == torch.float16
    assert torch.equal(model[1].packed.scale, packed.scale) and model[1].packed.rows == 3
    # one storage still one: offsets kept, writes through one view seen by the others
    assert model[0].bottom.data_ptr() - model[0].top.data_ptr() == 4 * 3 * 4
    assert model[0].transposed.data_ptr() == model[0].top.data_ptr()
    assert model[1].tied is model[1].weight
    assert isinstance(model[1].weight, nn.Parameter) and not model[1].weight.requires_grad
    assert isinstance(model[0].bias, nn.Parameter) and model[0].bias.requires_grad
    # every tensor in one block
    ptrs = [t.data_ptr() for t in (*model.state_dict().values(), model[1].packed.codes,
                                   model[1].packed.scale, model[0].transposed)]  # fmt: skip
    assert len({t.untyped_storage().data_ptr() for t in model.state_dict().values()}) == 1
    assert max(ptrs) - min(ptrs) < 4096
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_a_tensor_held_elsewhere_is_reported(caplog):
    model = nn.Linear(4, 4)
    elsewhere = model.weight  # noqa: F841 (the reference under test)
    with caplog.at_level(logging.WARNING, logger="lowbit.models.arena"):
        move_into_arena(model)
    assert "1 of the model's tensors are still held elsewhere" in caplog.text
    caplog.clear()
    fresh = nn.Linear(4, 4)
    with caplog.at_level(logging.WARNING, logger="lowbit.models.arena"):
        move_into_arena(fresh)
    assert "held elsewhere" not in caplog.text


@LINUX_MAPS
def test_an_empty_tensor_or_a_second_view_lets_go_of_its_file_map(tmp_path):
    # an empty tensor's address is 0, yet it held its shard's map; two objects viewing the same
    # bytes stay one tensor
    from safetensors.torch import load_file, save_file

    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(8, 8), "e": torch.zeros(0)}, str(path))
    state = load_file(str(path))
    module = nn.Module()
    module.register_buffer("w", state["w"])
    module.register_buffer("e", state["e"])
    module.view = state["w"][:]  # another object over the same bytes
    del state
    move_into_arena(module)
    assert str(path) not in Path("/proc/self/maps").read_text()
    assert module.view.data_ptr() == module.w.data_ptr()


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else None


def _huge_kb(start: int) -> int:
    """AnonHugePages (kB) of the mapping that holds address ``start``."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) <= start < int(head.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"),
                    reason="transparent huge pages are not enabled on this machine")  # fmt: skip
def test_the_block_is_on_huge_pages():
    block = arena(4 * HUGE_PAGE)
    assert block.data_ptr() % HUGE_PAGE == 0
    block.fill_(1)  # first touch: the kernel gives the advised range huge pages
    assert _huge_kb(block.data_ptr()) >= 2048
