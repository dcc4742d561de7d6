"""ONNX export of the encoder's serving function (the ``onnx`` extra: tf2onnx, onnxruntime).

The ONNX graph has the SavedModel's interface: input ``images`` float32 ``[batch, height,
width, 3]`` in ``[0, 1]`` (NHWC, dynamic batch, height and width) and outputs
``embedding`` ``[batch, C]`` and ``feature_map`` ``[batch, h, w, C]``. After conversion the
model is run with onnxruntime on a random batch and compared with TensorFlow; a maximum
absolute difference above ``tolerance`` (1e-4) is an error.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

import numpy as np
import tensorflow as tf

from harl_tf import atomic
from harl_tf.errors import ConfigError

INSTALL_HINT = 'pip install -e ".[onnx]"  (tf2onnx and onnxruntime)'


def onnx_available() -> bool:
    """True when tf2onnx and onnxruntime can be imported."""
    try:
        import onnxruntime  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError:
        return False
    return True


def require_onnx() -> None:
    """Raises a ConfigError with the install command when the extra is missing."""
    if not onnx_available():
        raise ConfigError(f"ONNX export needs tf2onnx and onnxruntime: {INSTALL_HINT}")


def export_onnx(serve: Callable, path: str, *, opset: int = 17,
                check_shape: Sequence[int] = (2, 64, 48, 3), tolerance: float = 1e-4,
                seed: int = 0) -> Dict[str, Any]:
    """Converts ``serve`` (images -> {"embedding", "feature_map"}) to ONNX at ``path``.

    Returns ``{"opset", "max_abs_diff", "check_shape"}``; raises ValueError when
    onnxruntime and TensorFlow disagree by more than ``tolerance`` on a random batch of
    ``check_shape``.
    """
    require_onnx()
    import onnxruntime
    import tf2onnx

    spec = (tf.TensorSpec([None, None, None, 3], tf.float32, name="images"),)
    function = tf.function(serve, input_signature=spec)
    with atomic.atomic_path(path) as tmp:  # a model that fails the check is not kept
        tf2onnx.convert.from_function(function, input_signature=spec, opset=opset,
                                      output_path=tmp)
        images = np.random.default_rng(seed).random(check_shape, dtype=np.float32)
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images})))
        want = {k: v.numpy() for k, v in function(tf.constant(images)).items()}
        diff = 0.0
        for key, value in want.items():
            match = [n for n in names if n.split(":")[0] == key]
            if not match:
                raise ValueError(f"ONNX model {path} has no output {key!r} "
                                 f"(outputs: {names}).")
            diff = max(diff, float(np.max(np.abs(got[match[0]] - value))))
        if not diff <= tolerance:
            raise ValueError(f"ONNX model disagrees with TensorFlow: max abs diff {diff:.3g} "
                             f"> {tolerance:g} on a batch of shape {tuple(check_shape)}.")
    return {"opset": int(opset), "max_abs_diff": diff, "check_shape": list(check_shape)}
