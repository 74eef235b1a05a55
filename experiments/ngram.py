"""A smoothed byte n-gram language model: the baseline a transformer LM must beat.

Interpolated Kneser-Ney (Chen & Goodman 1999, section 3) over bytes, orders
1..n, with one absolute discount per order D_k = n1 / (n1 + 2 n2) (n1, n2:
the numbers of k-grams seen once and twice). With c_k the count used at order
k (raw counts at the highest order n, continuation counts
N1+(. h w) = #{x : c(x h w) > 0} below it):

    P_k(w | h) = max(c_k(h w) - D_k, 0) / c_k(h)
                 + D_k * N1+(h .) / c_k(h) * P_{k-1}(w | h')        (c_k(h) > 0)
    P_k(w | h) = P_{k-1}(w | h')                                     (c_k(h) = 0)
    P_0(w)     = 1 / 256

where h has k - 1 bytes and h' is h without its first byte. Like the
transformer's windows (`kdq.data.text`), each document is read as
b"\\n" + text, every one of its bytes is predicted, and contexts never cross
documents (near a document's start the context is what precedes the byte).

Counts are sorted numpy arrays of base-256 codes of the k-grams, looked up
with `np.searchsorted`, so fitting the 3.9 MB Shakespeare train split and
scoring a held-out split take seconds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

VOCAB = 256


def _codes(data: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Base-256 codes (int64) of the `length`-byte strings starting at `starts`."""
    code = np.zeros(len(starts), np.int64)
    for offset in range(length):
        code = code * VOCAB + data[starts + offset]
    return code


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[i] where keys[i] == query, else 0 (keys sorted, unique)."""
    if len(keys) == 0:
        return np.zeros(len(queries), values.dtype)
    index = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[index] == queries, values[index], 0)


@dataclasses.dataclass(frozen=True)
class _Order:
    """The statistics of one order k: k-gram counts, context totals and types, discount."""

    grams: np.ndarray
    counts: np.ndarray
    contexts: np.ndarray
    totals: np.ndarray
    types: np.ndarray
    discount: float


def _order(grams: np.ndarray, counts: np.ndarray) -> _Order:
    """Order statistics from unique k-gram codes and their counts (raw or continuation)."""
    contexts, inverse = np.unique(grams // VOCAB, return_inverse=True)
    totals = np.bincount(inverse, weights=counts).astype(np.int64)
    types = np.bincount(inverse).astype(np.int64)
    n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
    discount = n1 / (n1 + 2 * n2) if n1 else 0.5
    return _Order(grams, counts, contexts, totals, types, float(discount))


def _document_positions(lengths: Sequence[int], order: int) -> np.ndarray:
    """Start offsets (in the concatenation) of every `order`-gram inside one document."""
    starts, offset = [], 0
    for length in lengths:
        if length >= order:
            starts.append(offset + np.arange(length - order + 1))
        offset += length
    return np.concatenate(starts) if starts else np.zeros(0, np.int64)


def _concatenate(documents: Sequence[bytes]) -> tuple[np.ndarray, list[int]]:
    texts = [b"\n" + d for d in documents]
    data = np.frombuffer(b"".join(texts), np.uint8).astype(np.int64)
    return data, [len(t) for t in texts]


class KneserNey:
    """An interpolated Kneser-Ney byte n-gram model (module docstring).

    Args:
      documents: the training documents (bytes).
      order: n, the longest k-gram (5: four bytes of context).
    """

    def __init__(self, documents: Sequence[bytes], order: int = 5):
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        self.order = order
        data, lengths = _concatenate(documents)
        raw_grams, raw_counts = {}, {}
        for k in range(1, order + 1):
            codes = _codes(data, _document_positions(lengths, k), k)
            raw_grams[k], raw_counts[k] = np.unique(codes, return_counts=True)
        self.orders = {order: _order(raw_grams[order], raw_counts[order])}
        for k in range(1, order):
            # N1+(. h w): one count per distinct (k+1)-gram x h w, credited to h w.
            suffixes = raw_grams[k + 1] % (VOCAB**k)
            grams, counts = np.unique(suffixes, return_counts=True)
            self.orders[k] = _order(grams, counts)

    def _probability(self, data: np.ndarray, positions: np.ndarray, k: int) -> np.ndarray:
        """P_k(data[p] | the k - 1 bytes before p), for positions with at least k - 1 before."""
        if k == 0:
            return np.full(len(positions), 1.0 / VOCAB)
        lower = self._probability(data, positions, k - 1)
        stats = self.orders[k]
        grams = _codes(data, positions - (k - 1), k)
        count = _lookup(stats.grams, stats.counts, grams).astype(np.float64)
        total = _lookup(stats.contexts, stats.totals, grams // VOCAB).astype(np.float64)
        types = _lookup(stats.contexts, stats.types, grams // VOCAB).astype(np.float64)
        seen = total > 0
        safe_total = np.where(seen, total, 1.0)
        interpolated = (
            np.maximum(count - stats.discount, 0.0) / safe_total
            + stats.discount * types / safe_total * lower
        )
        return np.where(seen, interpolated, lower)

    def bits_per_byte(self, documents: Sequence[bytes]) -> float:
        """-1/N sum log2 P(byte | up to n - 1 preceding bytes of its document), every byte."""
        data, lengths = _concatenate(documents)
        log_total, count, offset = 0.0, 0, 0
        for length in lengths:
            positions = offset + np.arange(1, length)
            context = positions - offset
            for k in range(1, self.order + 1):
                # Positions whose document offers exactly k - 1 bytes of context use order k;
                # the rest use the full order n.
                chosen = positions[np.minimum(context, self.order - 1) == k - 1]
                if len(chosen):
                    log_total += float(np.sum(np.log(self._probability(data, chosen, k))))
                    count += len(chosen)
            offset += length
        return -log_total / max(count, 1) / math.log(2)
