"""The encoder's weights under torchvision's ResNet names and layouts (SPEC section 8).

The detection transfer of the paper (Faster / Mask R-CNN) runs in PyTorch frameworks, so
the encoder is written as a torchvision ``resnet{depth}`` ``state_dict`` without ``fc.*``:

==============================  ============================================  ==========
Keras variable                  torchvision key                               layout
==============================  ============================================  ==========
``<layer>/kernel`` (Conv2D)     ``<module>.weight``                           HWIO -> OIHW
``<bn>/gamma``, ``/beta``       ``<module>.weight``, ``<module>.bias``        [C]
``<bn>/moving_mean``, ``/var``  ``<module>.running_mean``, ``.running_var``   [C]
(none)                          ``<bn module>.num_batches_tracked``           int64 scalar 0
==============================  ============================================  ==========

with ``<module>`` the Keras layer name with "_" replaced by "." (``layer1_0_downsample_1``
-> ``layer1.0.downsample.1``; :func:`harl_tf.models.resnet.torchvision_key`). Load with
``model.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(path).items()},
strict=False)`` (strict=False because ``fc`` is absent).

Detectron2: :func:`detectron2_checkpoint` renames the keys exactly as detectron2's
``tools/convert-torchvision-to-d2.py`` does (``conv1`` -> ``stem.conv1``, ``bn1`` ->
``stem.conv1.norm``, ``layer1`` -> ``res2``, ``bn{i}`` -> ``conv{i}.norm``,
``downsample.0/1`` -> ``shortcut``/``shortcut.norm``; ``num_batches_tracked`` dropped) and
pickles ``{"model": {name: numpy array}, "__author__": "harl-tf", "matching_heuristics":
True}``, which ``DetectionCheckpointer`` loads as-is (the heuristics then add the
``backbone.bottom_up.`` prefix). Use it with detectron2's torchvision-style settings:
``MODEL.PIXEL_MEAN [123.675, 116.280, 103.530]``, ``MODEL.PIXEL_STD [58.395, 57.120,
57.375]``, ``INPUT.FORMAT "RGB"``, ``MODEL.RESNETS.STRIDE_IN_1X1 False`` (v1.5 blocks).
Our encoder normalises inside; these constants are the same ImageNet mean/std at 0-255.
"""
from __future__ import annotations

import pickle
import re
from typing import Dict

import keras
import numpy as np

from harl_tf import atomic
from harl_tf.models import resnet

DETECTRON2_AUTHOR = "harl-tf"


def torchvision_state_dict(encoder: keras.Model, *,
                           num_batches_tracked: bool = True) -> Dict[str, np.ndarray]:
    """``{torchvision key: numpy array}`` of a :class:`ResNet` (module docstring)."""
    state: Dict[str, np.ndarray] = {}
    for variable in encoder.variables:
        key = resnet.torchvision_key(variable.path)
        value = np.asarray(variable.numpy())
        if variable.path.endswith("/kernel"):
            value = value.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]
        state[key] = np.ascontiguousarray(value, dtype=np.float32)
        if num_batches_tracked and key.endswith(".running_var"):
            state[key[:-len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return state


def detectron2_key(torchvision_key: str) -> str:
    """detectron2 ResNet name of a torchvision key (convert-torchvision-to-d2.py rules)."""
    key = torchvision_key
    if "layer" not in key:
        key = "stem." + key
    for stage in (1, 2, 3, 4):
        key = key.replace(f"layer{stage}", f"res{stage + 1}")
    key = re.sub(r"bn(\d)", r"conv\1.norm", key)
    key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    return key


def detectron2_checkpoint(state: Dict[str, np.ndarray]) -> Dict[str, object]:
    """The dict detectron2's ``DetectionCheckpointer`` reads from a ``.pkl``."""
    model = {detectron2_key(k): v for k, v in state.items()
             if not k.endswith("num_batches_tracked")}
    return {"model": model, "__author__": DETECTRON2_AUTHOR, "matching_heuristics": True}


def save_npz(path: str, state: Dict[str, np.ndarray]) -> None:
    """Writes the state dict as an uncompressed ``.npz`` (keys are the torchvision names)."""
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **state)


def save_detectron2(path: str, state: Dict[str, np.ndarray]) -> None:
    """Writes :func:`detectron2_checkpoint` of ``state`` as a pickle (``.pkl``)."""
    checkpoint = detectron2_checkpoint(state)
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(checkpoint, f, protocol=4)


def compatibility_notes(config: Dict[str, object]) -> list:
    """Reasons an encoder of ``config`` differs from torchvision's standard ResNet."""
    notes = []
    if config.get("small_stem"):
        notes.append("small_stem: conv1 is 3x3 stride 1 and there is no max-pool; "
                     "torchvision's conv1 is 7x7 stride 2 + max-pool.")
    if config.get("width_multiplier", 1) != 1:
        notes.append(f"width_multiplier={config['width_multiplier']}: every channel count "
                     "is scaled (this is not torchvision's wide_resnet).")
    if config.get("output_stride", 32) != 32:
        notes.append(f"output_stride={config['output_stride']}: set the matching strides "
                     "(or replace_stride_with_dilation) on the PyTorch side.")
    return notes
