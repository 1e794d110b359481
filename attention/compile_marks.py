"""Marks for ``torch.compile`` that cost nothing at import time.

``torch.compiler.assume_constant_result`` imports ``torch._dynamo`` (seconds on a CPU) the
moment a module decorated with it is imported, which every linvid command would pay before any
work, compiled or not. The decorator only sets the marker attribute Dynamo reads when it traces
a call; this module sets the same marker without the import (``tests/test_attention_compile.py``
checks it is the marker torch sets, and compiles the marked functions with ``fullgraph=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def assume_constant_result(fn: F) -> F:
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo``: under
    ``torch.compile`` a call of ``fn`` runs at trace time and its result is a graph constant."""
    fn._dynamo_marked_constant = True
    return fn
