"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / DINO).

For a query q and training features x_i (both L2-normalised), take the k training
examples with the largest cosine similarity s_i = <q, x_i> and let each vote for its
class with weight exp(s_i / T):

    score_c(q) = sum_{i in topk(q)} exp(s_i / T) * [y_i = c].

Top-1 / top-5 come from ranking score_c. DINO's defaults are k = 20, T = 0.07.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from harl_tf.downstream.linear import topk_accuracy


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def knn_scores(train_features: np.ndarray, train_labels: np.ndarray,
               query_features: np.ndarray, num_classes: int, *, k: int = 20,
               temperature: float = 0.07, chunk_size: int = 1024) -> np.ndarray:
    """Class scores ``[Q, num_classes]`` of each query (formula in the module docstring).

    Args:
      train_features: ``[N, C]``; train_labels: ``[N]`` ints in [0, num_classes).
      query_features: ``[Q, C]``.
      k: neighbours (capped at N); temperature: T > 0.
      chunk_size: queries per similarity block (memory ``chunk_size * N`` floats).
    """
    if k < 1:
        raise ValueError(f"--knn_k must be >= 1, got {k}.")
    if not temperature > 0:
        raise ValueError(f"--knn_temperature must be > 0, got {temperature}.")
    train = l2_normalize(train_features)
    queries = l2_normalize(query_features)
    labels = np.asarray(train_labels, np.int64)
    k = min(int(k), len(train))
    scores = np.zeros((len(queries), num_classes), np.float64)
    for start in range(0, len(queries), chunk_size):
        sims = queries[start:start + chunk_size] @ train.T           # [q, N]
        neighbours = np.argpartition(-sims, k - 1, axis=1)[:, :k]     # [q, k]
        top_sims = np.take_along_axis(sims, neighbours, axis=1)
        weights = np.exp((top_sims - 1.0) / temperature)  # exp(s/T) up to a per-row factor
        rows = np.repeat(np.arange(len(neighbours)), k)
        np.add.at(scores[start:start + chunk_size], (rows, labels[neighbours].ravel()),
                  weights.ravel())
    return scores


def knn_evaluate(train_features, train_labels, query_features, query_labels, num_classes,
                 *, k: int = 20, temperature: float = 0.07) -> Dict[str, float]:
    """``{"top1", "top5"}`` accuracy (fractions) of the weighted k-NN classifier."""
    scores = knn_scores(train_features, train_labels, query_features, num_classes, k=k,
                        temperature=temperature)
    return topk_accuracy(scores, query_labels)
