"""Heuristic foreground masks: the method registry and shared helpers.

A *mask method* is an object with

- ``.name`` (str) and ``.params`` (a JSON-able dict recorded with every mask it makes),
- ``__call__(image) -> uint8 {0, 1} [H, W]`` for an ``uint8`` RGB image ``[H, W, 3]``,
- ``compute(image) -> MaskResult``, which also says whether a fallback was used,
- ``last_fallback``: the fallback reason of the latest call (``None`` when none was used).

``get_method(name, **params)`` builds one; ``available_methods()`` lists the names.
Methods are registered as ``"module:factory"`` strings and imported on first use, so
importing this package stays cheap (no TensorFlow) and a method such as ``"deep"`` is
added with one line in ``_REGISTRY`` (or one ``register_method`` call).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from harl_tf.errors import ConfigError, DataError

__all__ = [
    "MaskResult", "available_methods", "compute_mask", "get_method", "register_method",
    "to_rgb_uint8",
]


@dataclasses.dataclass(frozen=True)
class MaskResult:
    """One computed mask.

    ``mask``: ``uint8 {0, 1} [H, W]`` at the input's resolution.
    ``fallback``: ``None`` when the method's own estimate was used, otherwise a short reason
    (e.g. ``"uniform"``, ``"empty"``) and ``mask`` is the method's documented fallback.
    ``info``: method-specific numbers (e.g. segment count, threshold), JSON-able.
    """
    mask: np.ndarray
    fallback: Optional[str] = None
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def used_fallback(self) -> bool:
        return self.fallback is not None


# name -> "module:factory". The factory is called with the method's keyword parameters.
_REGISTRY: Dict[str, Union[str, Callable[..., Any]]] = {
    "conventional": "harl_tf.masks.conventional:ConventionalMethod",
    "deep": "harl_tf.masks.deep:DeepSaliencyMasks",  # imports TensorFlow on first use
}


def register_method(name: str, factory: Union[str, Callable[..., Any]]) -> None:
    """Registers ``factory`` (a callable, or a lazy ``"module:attribute"`` string) under
    ``name``; a later registration under the same name replaces the earlier one."""
    if not name or not isinstance(name, str):
        raise ValueError(f"register_method: name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = factory


def available_methods() -> Tuple[str, ...]:
    """The registered method names, sorted."""
    return tuple(sorted(_REGISTRY))


def _resolve(name: str) -> Callable[..., Any]:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown mask method {name!r}; expected one of {list(available_methods())}"
        ) from None
    if isinstance(factory, str):
        module_name, _, attribute = factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attribute)
    return factory


def get_method(name: str, **params: Any):
    """Builds the mask method ``name`` with keyword ``params`` (unknown parameters raise
    ``TypeError`` naming them)."""
    return _resolve(name)(**params)


def compute_mask(image: np.ndarray, method: str = "conventional", **params: Any) -> MaskResult:
    """One-off convenience: ``get_method(method, **params).compute(to_rgb_uint8(image))``.
    Build the method once with ``get_method`` when masking many images."""
    return get_method(method, **params).compute(to_rgb_uint8(image))


def to_rgb_uint8(array: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Normalises any image array to ``uint8`` RGB ``[H, W, 3]`` (C-contiguous).

    Channels: ``[H, W]`` and ``[H, W, 1]`` are grey and repeated to three channels;
    ``[H, W, 2]`` is grey + alpha and ``[H, W, 4]`` is RGBA: the alpha channel is dropped
    (not composited, so the colours are the stored ones).
    Values: ``uint8`` as is; ``bool`` to 0/255; ``uint16`` by ``round(v / 257)``; other
    integer types are read as 8-bit when their maximum is at most 255, as 16-bit when at
    most 65535, and are otherwise scaled by their maximum; floats are read as ``[0, 1]``
    when their maximum is at most 1 and as ``[0, 255]`` otherwise, clipped, NaN to 0.
    ``name`` appears in error messages (e.g. the file the array came from).
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] in (1, 2, 3, 4):
        channels = array.shape[-1]
    elif array.ndim == 2:
        array, channels = array[..., None], 1
    else:
        raise DataError(
            f"{name}: expected an image [H, W] or [H, W, C] with C in 1..4, "
            f"got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{name}: image has no pixels (shape {array.shape})")
    if channels == 1 or channels == 2:
        array = np.repeat(array[..., :1], 3, axis=-1)
    elif channels == 4:
        array = array[..., :3]

    if array.dtype == np.uint8:
        out = array
    elif array.dtype == np.bool_:
        out = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        out = ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        top = int(array.max())
        values = np.clip(array.astype(np.float64), 0, None)
        scale = 1.0 if top <= 255 else (255.0 / 65535.0 if top <= 65535 else 255.0 / top)
        out = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if values.max() <= 1.0 else 1.0
        out = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
    else:
        raise DataError(f"{name}: unsupported pixel type {array.dtype}")
    return np.ascontiguousarray(out)
