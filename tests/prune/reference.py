"""Independent numpy references for kdq.prune (float64, explicit loops where clearer)."""

from __future__ import annotations

import numpy as np


def prune_lowest(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep mask of a 1-D array pruning the k smallest by (score, index)."""
    order = sorted(range(scores.size), key=lambda i: (scores[i], i))
    keep = np.ones(scores.size, bool)
    keep[order[:k]] = False
    return keep


def importance(w, grad=None):
    w = np.asarray(w, np.float64)
    return np.abs(w) if grad is None else np.abs(w * np.asarray(grad, np.float64))


def unstructured_mask(w, sparsity, grad=None):
    w = np.asarray(w)
    k = round(sparsity * w.size)
    return prune_lowest(importance(w, grad).ravel(), k).reshape(w.shape)


def channel_mask(w, sparsity, norm, grad=None):
    w = np.asarray(w)
    imp = importance(w, grad).reshape(-1, w.shape[-1])
    scores = np.array(
        [
            imp[:, c].sum() if norm == "l1" else np.sqrt((imp[:, c] ** 2).sum())
            for c in range(w.shape[-1])
        ]
    )
    keep = prune_lowest(scores, round(sparsity * w.shape[-1]))
    return np.broadcast_to(keep, w.shape).copy()


def nm_mask(w, n, m, grad=None):
    """Loops over every group of m along axis -2; prunes its m - n smallest by (score, index)."""
    w = np.asarray(w)
    imp = importance(w, grad)
    keep = np.zeros(w.shape, bool)
    for lead in np.ndindex(*w.shape[:-2]):
        for out in range(w.shape[-1]):
            for start in range(0, w.shape[-2], m):
                group = imp[lead + (slice(start, start + m), out)]
                keep[lead + (slice(start, start + m), out)] = prune_lowest(group, m - n)
    return keep


def global_masks(leaves, sparsity):
    sizes = [np.asarray(x).size for x in leaves]
    scores = np.concatenate([importance(x).ravel() for x in leaves])
    keep = prune_lowest(scores, round(sparsity * scores.size))
    out, start = [], 0
    for x, size in zip(leaves, sizes, strict=True):
        out.append(keep[start : start + size].reshape(np.shape(x)))
        start += size
    return out


def polynomial(step, initial, final, begin, end, frequency, power=3):
    """Zhu & Gupta (2017), evaluated at the last update step <= step."""
    if step < begin:
        return initial
    if step > end:
        return final
    last = begin + ((step - begin) // frequency) * frequency
    return final + (initial - final) * (1 - (last - begin) / (end - begin)) ** power
