"""The Kneser-Ney byte n-gram baseline against a dictionary implementation of its formula."""

import collections
import math

import numpy as np
import pytest

from experiments.ngram import KneserNey

DOCS = [b"abracadabra abracadabra", b"cadabra bar", b"the bar is a car"]


def _reference(documents, order):
    """P(w | h) by Chen & Goodman's interpolated Kneser-Ney, written with dicts."""
    texts = [b"\n" + d for d in documents]
    raw = collections.Counter(
        t[i : i + k] for t in texts for k in range(1, order + 1) for i in range(len(t) - k + 1)
    )
    counts = {}
    for k in range(1, order + 1):
        grams = {g: c for g, c in raw.items() if len(g) == k}
        if k < order:
            longer = [g for g in raw if len(g) == k + 1]
            grams = collections.Counter(g[1:] for g in longer)
        counts[k] = grams
    discounts = {}
    for k, grams in counts.items():
        n1 = sum(c == 1 for c in grams.values())
        n2 = sum(c == 2 for c in grams.values())
        discounts[k] = n1 / (n1 + 2 * n2)

    def prob(w, h):
        k = len(h) + 1
        lower = 1 / 256 if k == 1 else prob(w, h[1:])
        grams = counts[k]
        total = sum(c for g, c in grams.items() if g[:-1] == h)
        if total == 0:
            return lower
        types = sum(1 for g in grams if g[:-1] == h)
        d = discounts[k]
        return max(grams.get(h + bytes([w]), 0) - d, 0) / total + d * types / total * lower

    return prob


def _model_probability(model, context: bytes, byte: int) -> float:
    data = np.frombuffer(context + bytes([byte]), np.uint8).astype(np.int64)
    return float(model._probability(data, np.array([len(context)]), len(context) + 1)[0])


@pytest.mark.parametrize("context", [b"ab", b"ra", b"zz", b" b", b"\nt", b"a", b""])
def test_probabilities_match_the_formula_and_sum_to_one(context):
    model = KneserNey(DOCS, order=3)
    reference = _reference(DOCS, 3)
    probs = [_model_probability(model, context, w) for w in range(256)]
    assert sum(probs) == pytest.approx(1.0, abs=1e-12)
    for w in (ord("a"), ord("c"), ord("r"), ord("q")):
        assert probs[w] == pytest.approx(reference(w, context), rel=1e-12)


def test_bits_per_byte_is_the_mean_surprisal_of_every_byte():
    model = KneserNey(DOCS, order=3)
    reference = _reference(DOCS, 3)
    held_out = [b"abracadabra car", b"bar"]
    surprisals = []
    for doc in held_out:
        text = b"\n" + doc
        for i in range(1, len(text)):
            context = text[max(0, i - 2) : i]
            surprisals.append(-math.log2(reference(text[i], context)))
    assert model.bits_per_byte(held_out) == pytest.approx(np.mean(surprisals), rel=1e-12)


def test_a_longer_context_fits_the_training_text_better():
    text = [b"to be or not to be that is the question " * 20]
    bits = [KneserNey(text, order=n).bits_per_byte(text) for n in (1, 3, 5)]
    assert bits[0] > bits[1] > bits[2]
