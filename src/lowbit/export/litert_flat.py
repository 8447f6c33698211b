"""Small edits of a LiteRT flatbuffer object (``ModelT``, from ai-edge-litert's
``flatbuffer_utils.read_model``): a buffer, an operator code, a metadata entry. The schema's
generated classes do the reading and writing; these are only the few steps lowbit's exporters
repeat on top of them."""

from __future__ import annotations

import numpy as np


def add_buffer(model, data: np.ndarray) -> int:
    """Append a buffer holding ``data``'s bytes; returns its index."""
    from ai_edge_litert import schema_py_generated as fb

    buf = fb.BufferT()
    buf.data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    model.buffers.append(buf)
    return len(model.buffers) - 1


def builtin(model, op) -> int:
    """The builtin operator an operator runs (old files keep small codes in a deprecated field)."""
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def opcode(model, builtin_op: int) -> int:
    """The index of ``builtin_op``'s operator code, added when the model has none."""
    from ai_edge_litert import schema_py_generated as fb

    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin_op:
            return i
    code = fb.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode = builtin_op, min(builtin_op, 127)
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def add_metadata(model, name: bytes, data: bytes) -> None:
    """Append a named metadata entry holding ``data``."""
    from ai_edge_litert import schema_py_generated as fb

    meta = fb.MetadataT()
    meta.name, meta.buffer = name, add_buffer(model, np.frombuffer(data, dtype=np.uint8))
    model.metadata = [*(model.metadata or []), meta]
