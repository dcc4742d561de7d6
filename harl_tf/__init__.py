"""harl-tf: Heuristic Attention Representation Learning (Tran et al., Sensors 2022) in
TensorFlow 2 / Keras 3."""

__version__ = "0.1.0"
