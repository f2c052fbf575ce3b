"""A restricted unpickler for `.ckpt` files: tensors and a few harmless types, nothing else.

A pickle can name any importable callable and have it called while loading (`os.system`, `eval`, ...), so a
checkpoint from the internet must not go through plain `pickle`. This module is passed to torch as its
`pickle_module` (it has the `Unpickler` and `load` names torch uses), so torch's own zip and legacy readers run
with `find_class` restricted to an allow-list. Any other global is refused before it is imported or called.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Mapping
from types import MappingProxyType
from typing import IO, Any

from sdserver.errors import UnsafeCheckpoint

# (module, name) pairs a checkpoint may refer to. Storage classes are resolved by torch before they reach
# `find_class`; the ones listed here are for the legacy (pre-1.6) format and direct references.
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch.nn.parameter", "Parameter"),
        ("torch", "Tensor"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch.storage", "UntypedStorage"),
        ("torch.storage", "TypedStorage"),
        *(
            ("torch", f"{kind}Storage")
            for kind in (
                "Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool", "Untyped",
            )
        ),
        *(
            ("torch", dtype)
            for dtype in (
                "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
            )
        ),
        # Training checkpoints keep step counters and scores as numpy scalars; numpy pickles their raw bytes
        # through `_codecs.encode`, a pure function.
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("_codecs", "encode"),
    }
)

# Old PyTorch-Lightning checkpoints pickle their callback objects. Importing Lightning would run its code,
# so these load as inert placeholders instead.
_PLACEHOLDERS: frozenset[tuple[str, str]] = frozenset(
    {
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
        ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"),
    }
)

# numpy 2 moved `numpy.core` to `numpy._core`; the old path still imports but warns.
_MODULE_RENAMES: Mapping[str, str] = MappingProxyType({"numpy.core.multiarray": "numpy._core.multiarray"})


class Placeholder:
    """Stands in for an object a checkpoint carries but the server never uses; it keeps the pickled state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _import_global(module: str, name: str) -> Any:
    for candidate in (_MODULE_RENAMES.get(module), module):
        if candidate is None:
            continue
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafeCheckpoint(f"checkpoint refers to {module}.{name}, which this installation can't provide")


class Unpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` admits only the allow-list above."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLACEHOLDERS:
            return Placeholder
        if (module, name) in _ALLOWED:
            return _import_global(module, name)
        raise UnsafeCheckpoint(
            f"refusing to load a checkpoint that refers to the global '{module}.{name}': "
            "only tensors and plain containers are allowed in .ckpt files"
        )


def load(file: IO[bytes], **kwargs: Any) -> Any:
    """`pickle.load` with the restricted `find_class`; torch calls this for the legacy format's headers."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    return load(io.BytesIO(data), **kwargs)
