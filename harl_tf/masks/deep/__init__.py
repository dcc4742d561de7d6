"""The deep heuristic mask: a frozen encoder and a 1×1 saliency head (SPEC §7; paper §3.2,
Appendix C.2).

**Model.** A frozen encoder ``f`` maps an image (float32 ``[0, 1]``, resized to
``input_size × input_size``) to a feature map ``h = f(x)`` ``[h, w, C]``. A 1×1 convolution
with a sigmoid predicts the foregroundness of every cell, ``p = σ(h · k + b)``
(``k`` ``[1, 1, C, 1]``, ``b`` ``[1]``). ``p`` is bilinearly upsampled to the image's own
``[H, W]`` and thresholded: foreground where ``p > threshold`` (0.5; "values greater than the
threshold are foreground", paper §3.2), so 0.49 → 0 and 0.51 → 1. That is the paper's
configuration (``RefineConfig("none")``, one input size); beyond it, the encoder can run at
several input sizes (finer and multi-scale features) and the map can be refined along the
image's edges before the threshold (:mod:`~harl_tf.masks.deep.refine`).

One module per concern:

=====================  ===================================================================
``encoder``            :class:`FrozenEncoder`: any SavedModel with the export contract of
                       :mod:`harl_tf.saved_encoder` (``images`` → ``feature_map``), or an
                       in-memory Keras encoder, saved inside the mask model as such a
                       SavedModel so that every mask model loads the same way.
``data``               what the encoder sees: :func:`encoder_input`, :func:`upsample`,
                       tf.data over arrays and files, :func:`load_training_set`.
``pseudo_labels``      cell targets fused from several pseudo-masks (cells where all agree).
``head_training``      :func:`train_saliency_head` on pseudo-masks, then self-training.
``context_head``       :class:`ContextHead`: a 3×3 + 1×1 two-layer head (each cell sees
                       its neighbours), beside the paper's 1×1 :class:`SaliencyHead`.
``refine``             boundary refinement of the cell map (Felzenszwalb segments, guided
                       filter, GrabCut) and the threshold: :class:`RefineConfig`.
``saliency_model``     :class:`SaliencyHead`, :class:`SaliencyModel` and its directory
                       (``saliency_head.json``, ``head_weights.npz``, ``encoder/``);
                       multi-scale features (several encoder input sizes).
``inference``          :class:`DeepSaliencyMasks`, the registry method ``"deep"``.
=====================  ===================================================================

Everything is importable from here (``from harl_tf.masks.deep import FrozenEncoder``).
"""
from harl_tf.masks.deep.encoder import FrozenEncoder
from harl_tf.masks.deep.data import (TF_DECODABLE, encoder_input, load_training_set,
                                     upsample)
from harl_tf.masks.deep.refine import RefineConfig, refined_mask, segment_average
from harl_tf.masks.deep.context_head import ContextHead, fit_context_head
from harl_tf.masks.deep.pseudo_labels import (CONVENTIONAL_SETTINGS, conventional_mask_sets,
                                              fused_cell_targets)
from harl_tf.masks.deep.saliency_model import (CONFIG_FILE, ENCODER_DIR, FORMAT,
                                               FORMAT_VERSION, WEIGHTS_FILE, SaliencyHead,
                                               SaliencyModel)
from harl_tf.masks.deep.head_training import (TrainConfig, cell_targets, compute_features,
                                              confident_targets, fit_head,
                                              train_saliency_head)
from harl_tf.masks.deep.inference import DeepSaliencyMasks

__all__ = [
    "CONFIG_FILE", "CONVENTIONAL_SETTINGS", "ContextHead", "DeepSaliencyMasks", "ENCODER_DIR",
    "FORMAT", "FORMAT_VERSION", "FrozenEncoder", "RefineConfig", "SaliencyHead",
    "SaliencyModel", "TF_DECODABLE", "TrainConfig", "WEIGHTS_FILE", "cell_targets",
    "compute_features", "confident_targets", "conventional_mask_sets", "encoder_input",
    "fit_context_head", "fit_head", "fused_cell_targets", "load_training_set", "refined_mask",
    "segment_average", "train_saliency_head", "upsample",
]
