"""Layers whose weight model code reads as a tensor instead of calling the layer.

Mamba's mixer computes ``self.dt_proj.weight @ x`` itself: a quantized layer holds codes, not a
weight, so such a layer must stay float. Python has no tool that says which attribute reads a
forward reaches, so the class's code is parsed (``ast``) and a read counts unless an enclosing
``if`` rules it out on this instance (only code that ``forward`` runs counts: ``forward`` and
the methods it calls as ``self.<method>(...)``, not helpers such as diffusers' projection
fusing): a test made of ``self`` flags, constants and comparisons (BLOOM's ``if
self.pretraining_tp > 1 and self.slow_but_exact``, Mamba's training-only fused path behind
``if self.training and ...``) is evaluated, and anything else counts as reachable. Not
followed: bases defined in other files, ``super()`` calls, functions outside the class that
are handed ``self``, reads through an index (``self.x[0].weight``); a read missed there fails
at the canary as it did before.
"""

from __future__ import annotations

import ast
import functools
import inspect
import operator
import textwrap

from torch import nn

_UNKNOWN = object()
_COMPARE = {ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Is: operator.is_,
            ast.IsNot: operator.is_not}  # fmt: skip
_PLAIN = (bool, int, float, str, type(None))


class TensorReads:
    """Which children of a module its class's code reads ``.weight``/``.bias`` of."""

    def reads(self, parent: nn.Module, child: str) -> bool:
        """Whether ``parent``'s code (its class, or a base in the same file) reaches a read of
        ``self.<child>.weight`` or ``self.<child>.bias``."""
        trees, mentioned = _forward_code(type(parent))
        if child not in mentioned:  # (most layers: no walk)
            return False
        return any(self._reaches(tree, parent, child) for tree in trees)

    def _reaches(self, node: ast.AST, parent: nn.Module, child: str) -> bool:
        if isinstance(node, ast.If | ast.IfExp):
            test = _value(node.test, parent)
            branches = [node.test]
            if test is _UNKNOWN or test:
                branches += node.body if isinstance(node.body, list) else [node.body]
            if test is _UNKNOWN or not test:
                branches += node.orelse if isinstance(node.orelse, list) else [node.orelse]
            return any(self._reaches(n, parent, child) for n in branches)
        if _is_read(node, child):
            return True
        return any(self._reaches(n, parent, child) for n in ast.iter_child_nodes(node))


@functools.lru_cache(maxsize=1024)  # a function of the class's code, asked several times per
def _forward_code(cls: type) -> tuple[tuple[ast.AST, ...], frozenset[str]]:  # run (40 ms each)
    """The methods ``forward`` runs in ``cls`` (its own, or a base's in the same file),
    parsed, and the children they read a tensor of anywhere."""
    methods: dict[str, ast.AST] = {}
    for base in cls.__mro__:  # bases in other files (a library's shared base classes) hold
        if base.__module__ != cls.__module__:  # no children of their own
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(base)))
        except (OSError, TypeError, SyntaxError):  # no code to read (built in, a REPL)
            continue
        for node in tree.body[0].body if tree.body else ():
            if isinstance(node, ast.FunctionDef):
                methods.setdefault(node.name, node)  # the subclass's wins
    trees = tuple(_run_by_forward(methods))
    mentioned = frozenset(
        n.value.attr
        for tree in trees
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and _is_read(n, getattr(n.value, "attr", ""))
    )
    return trees, mentioned


def _run_by_forward(methods: dict[str, ast.AST]) -> list[ast.AST]:
    """``forward`` and the methods it reaches through ``self.<method>(...)`` calls."""
    todo, seen = ["forward"], []
    while todo:
        name = todo.pop()
        if name in seen or name not in methods:
            continue
        seen.append(name)
        for node in ast.walk(methods[name]):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and _is_self(func.value):
                todo.append(func.attr)
    return [methods[name] for name in seen]


def _is_read(node: ast.AST, child: str) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr in ("weight", "bias")
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == child
        and _is_self(node.value.value)
    )


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _value(node: ast.AST, module: nn.Module) -> object:
    """The value of a test on ``module``'s plain attributes, or ``_UNKNOWN``: three-valued, so
    ``False and <anything>`` is False."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        if node.value.id != "self":
            return _UNKNOWN
        try:
            value = getattr(module, node.attr, _UNKNOWN)
        except Exception:  # a property that raises: its value is unknown here
            return _UNKNOWN
        return value if isinstance(value, _PLAIN) else _UNKNOWN
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        value = _value(node.operand, module)
        return _UNKNOWN if value is _UNKNOWN else not value
    if isinstance(node, ast.BoolOp):
        stop = isinstance(node.op, ast.Or)  # the truth value that decides the whole
        unknown = False
        for part in node.values:
            value = _value(part, module)
            if value is _UNKNOWN:
                unknown = True
            elif bool(value) is stop:
                return stop
        return _UNKNOWN if unknown else not stop
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
        left, right = _value(node.left, module), _value(node.comparators[0], module)
        if left is _UNKNOWN or right is _UNKNOWN:
            return _UNKNOWN
        try:
            return _COMPARE[type(node.ops[0])](left, right)
        except TypeError:
            return _UNKNOWN
    return _UNKNOWN
