"""Where a loaded model's tensors live: one block of memory, on huge pages where Linux gives them.

A decode step streams every weight once per token. On 4 KB pages a weight stream crosses a page
every 64 cache lines, each a TLB miss and a point where the CPU's prefetchers stop; a 2 MB huge
page holds 512 of them. Measured on a 2-core AMD EPYC (Zen 4) VM: a 4-bit GEMV of 42.5 MB from
memory read 18-19 GB/s on 4 KB pages and 22-23 GB/s on huge pages (torch's float sum of a
buffer that size: 27-29 against 35-36). Linux gives anonymous memory huge pages where the
process asks for them (``madvise(MADV_HUGEPAGE)``; transparent huge pages' default mode is
"madvise"), before the pages are first touched. :func:`move_into_arena` therefore copies every
tensor of a loaded model into one fresh block aligned to 2 MB and so advised. Tensors that view
one storage (tied weights, the views of stacked layers) stay views of one copy. Where the
advice is not available (another OS, THP disabled) the block is ordinary memory: the same
result, without the gain.

The block is an anonymous ``mmap`` advised through Python's own ``mmap.madvise``: torch's
``THP_MEM_ALLOC_ENABLE`` is read once per process, at its first allocation, and covers every
tensor of 2 MB or more, none of the smaller ones a layer of a small model has.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import mmap
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each storage starts on a cache line (and on any element size)
_TRIM_EVERY = 256 << 20  # bytes moved between returns of freed memory to the OS


def arena(nbytes: int) -> torch.Tensor:
    """``nbytes`` of zeroed uint8 memory starting on a 2 MB boundary, advised as huge pages where
    the OS takes that advice (see the module's docstring). A fresh anonymous mapping of its
    own: memory from the allocator may have been touched already, and pages faulted in before
    the advice stay small."""
    length = nbytes + -nbytes % HUGE_PAGE  # whole huge pages
    size = length + HUGE_PAGE  # (room to start on a boundary)
    # private: an anonymous mmap is shared by default, and shared memory takes huge pages only
    # where shmem's own THP setting allows (usually not)
    private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    mapping = mmap.mmap(-1, size, flags=private) if private else mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError as exc:  # (THP compiled out of the kernel): ordinary pages
            log.debug("madvise(MADV_HUGEPAGE) refused: %s", exc)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping while it lives
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + nbytes]


# A place that holds a tensor: (its tensor, a function that puts another tensor there)
Slot = tuple[torch.Tensor, Callable[[torch.Tensor], None]]


def release_free_heap() -> None:
    """Hand the C allocator's free memory back to the OS (glibc's ``malloc_trim``; elsewhere
    nothing). The tensors freed by the move sat in glibc's heap: without this, the 1.1B
    ``w4-sym-g32-head8`` folder loaded left 1,838 MB resident (1,507 before the move existed),
    with it 1,244 MB (peak 2,339 MB, as before). Called through ``ctypes``: no library wraps
    it."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (or no C library to open)
        return
    trim(ctypes.c_size_t(0))


def tensor_slots(model: nn.Module) -> Iterator[Slot]:
    """Every tensor ``model`` holds where loading code puts one: parameters, buffers, tensor
    attributes, the tensor fields of dataclass attributes (a kernel's weight, e.g.
    :class:`lowbit.kernels.int8.Int8Weight`), and the same inside lowbit's own helper objects
    that modules hold (e.g. the stacked weight of a :class:`lowbit.nn.shared_input.SharedInput`),
    each object once."""
    seen: set[int] = set()
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in list(table.items()):
                if t is not None:
                    yield t, _table_setter(table, key)
        yield from _attribute_slots(module, seen)


def _attribute_slots(owner: object, seen: set[int]) -> Iterator[Slot]:
    for key, value in list(vars(owner).items()):
        if isinstance(value, torch.Tensor):
            yield value, _attr_setter(owner, key)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                t = getattr(value, f.name)
                if isinstance(t, torch.Tensor):
                    yield t, _field_setter(owner, key, f.name)
        elif _helper(value) and id(value) not in seen:
            seen.add(id(value))
            yield from _attribute_slots(value, seen)


def _helper(value: object) -> bool:
    """One of lowbit's own plain objects (not a module: those are walked as modules)."""
    return (not isinstance(value, nn.Module) and hasattr(value, "__dict__")
            and type(value).__module__.startswith("lowbit."))  # fmt: skip


def _table_setter(table: dict, key: str) -> Callable[[torch.Tensor], None]:
    return lambda t: table.__setitem__(key, t)


def _attr_setter(owner: object, key: str) -> Callable[[torch.Tensor], None]:
    return lambda t: setattr(owner, key, t)


def _field_setter(owner: object, key: str, field: str) -> Callable[[torch.Tensor], None]:
    return lambda t: setattr(owner, key, dataclasses.replace(getattr(owner, key), **{field: t}))


def _movable(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and t.device.type == "cpu" and not t.is_quantized


def _span(views: list[torch.Tensor]) -> tuple[int, int]:
    """The bytes of their storage that ``views`` read: [first, end), first on a cache line."""
    first, end = [], []
    for t in views:
        start = t.storage_offset() * t.element_size()
        reach = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1
        first.append(start)
        end.append(start + (reach * t.element_size() if t.numel() else 0))
    lo = min(first)
    return lo - lo % _ALIGN, max(end)


def move_into_arena(model: nn.Module) -> None:
    """Copy every tensor of ``model`` (as :func:`tensor_slots` finds them) into one
    :func:`arena`, storage by storage (the bytes its tensors read): views keep their strides
    and relative offsets, tensors that share bytes still share them, parameters stay
    parameters and one object stays one (ties stay ties). An empty tensor (its storage may still
    hold a file's memory map) gets a fresh empty one. A storage that outlives the move (held
    somewhere this does not look) is logged: its bytes are then held twice."""
    groups: dict[int, list[Slot]] = {}
    for t, put in tensor_slots(model):
        if not _movable(t):
            continue
        if t.untyped_storage().nbytes() == 0:
            put(t.detach().clone())
        else:
            groups.setdefault(t.untyped_storage().data_ptr(), []).append((t, put))
    if not groups:
        return
    spans = {k: _span([t for t, _ in slots]) for k, slots in groups.items()}
    block = arena(sum(hi - lo + -(hi - lo) % _ALIGN for lo, hi in spans.values()))
    held, start = block.untyped_storage(), block.storage_offset()
    offset, survivors, trimmed = 0, [], 0
    for key in list(groups):
        slots, (lo, hi) = groups.pop(key), spans[key]
        old = slots[0][0].untyped_storage()
        source = torch.empty(0, dtype=torch.uint8).set_(old, lo, (hi - lo,), (1,))
        block[offset : offset + hi - lo].copy_(source)
        made: dict[int, torch.Tensor] = {}  # one new object per old one
        for t, put in slots:
            if id(t) not in made:
                at = (start + offset - lo) // t.element_size() + t.storage_offset()
                view = torch.empty(0, dtype=t.dtype).set_(held, at, t.shape, t.stride())
                made[id(t)] = (nn.Parameter(view, t.requires_grad)
                               if isinstance(t, nn.Parameter) else view)  # fmt: skip
            put(made[id(t)])
        survivors.append(StorageWeakRef(old))
        offset += hi - lo + -(hi - lo) % _ALIGN
        del slots, old, source, made, t
        if offset - trimmed > _TRIM_EVERY:  # the copied ones' old memory back to the OS
            release_free_heap()
            trimmed = offset
    release_free_heap()
    kept = sum(1 for ref in survivors if not ref.expired())
    if kept:
        log.warning("%d of the model's tensors are still held elsewhere after moving them into "
                    "one block: their bytes are held twice", kept)  # fmt: skip
