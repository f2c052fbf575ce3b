"""Recognising and describing faults inside jobs, without importing torch."""

from __future__ import annotations

from sdserver.engine.types import GenerationRequest
from sdserver.errors import OutOfMemory

# torch.OutOfMemoryError (and torch.cuda.OutOfMemoryError, its alias) and Python's MemoryError; matched by
# class name so this layer never imports torch.
_OOM_CLASS_NAMES = frozenset({"OutOfMemoryError", "MemoryError"})


def is_out_of_memory(exc: BaseException) -> bool:
    """True when `exc` (or anything in its class hierarchy) is an out-of-memory error."""
    if isinstance(exc, (MemoryError, OutOfMemory)):
        return True
    return any(cls.__name__ in _OOM_CLASS_NAMES for cls in type(exc).__mro__)


def out_of_memory_error(request: GenerationRequest | None) -> OutOfMemory:
    """The error a job fails with after running out of memory, suggesting what to make smaller."""
    if request is None:
        return OutOfMemory("Out of memory. Caches were freed; try again, or free memory on the device.")
    size = f"{request.width}x{request.height}"
    return OutOfMemory(
        f"Out of memory while generating {request.batch_size} image(s) of {size}. Caches were freed; "
        "try a smaller width/height or batch_size.",
        field="width",
    )
