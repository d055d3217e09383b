"""Run a block with a given number of torch intra-op threads, then restore the process setting.

Shared by the generator service, pair construction and the trainers: on small CPUs the right thread
count differs per job (one thread each when several processes share two cores), and a library call must
not leave the caller's setting changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """``torch.set_num_threads(count)`` for the block; None leaves the setting alone."""
    if count is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
