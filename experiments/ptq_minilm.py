"""Post-training quantization of the pretrained all-MiniLM-L6-v2 sentence encoder.

    python -m experiments.ptq_minilm --out=runs/ptq_minilm

Calibration: 256-byte passages of the validation plays; evaluation: passages
of the test plays (`kdq.data.shakespeare` split). For each method the
sentence embeddings of the quantized encoder are compared with the float
ones: mean and minimum cosine similarity, and top-1 nearest-neighbour
agreement (each passage's nearest other passage, by cosine, is the same as
under the float encoder), and genre accuracy of a linear probe: a
multinomial logistic regression fitted on the float embeddings of passages
of the train plays (its inverse regularisation C chosen by accuracy on
passages of the validation plays), applied unchanged to each method's
embeddings of the test passages (a deployed classifier whose encoder is
swapped for the quantized one). Weights: the Dense kernels of the six layers
(embeddings stay float); W8A8 adds per-token dynamic 8-bit inputs to them.
Writes <out>/report.json; the README's table is
`experiments/results/ptq_minilm_report.json`, a copy of one such report
(`format_table` prints it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression

from kdq.data.shakespeare import GENRES, plays_directory, split_plays
from kdq.models import load_pretrained
from kdq.quant import PTQMethod, QuantRecipe, QuantSpec, fake_quant_apply, layerwise_ptq

PASSAGE_BYTES = 256
MAX_TOKENS = 128
BATCH = 64
LAYERS = r"layer_\d+/.*/kernel"
PROBE_C = (0.1, 1.0, 10.0, 100.0)


def play_chunks(split: str) -> tuple[list[str], list[int]]:
    """Every non-overlapping 256-byte chunk of the split's plays, and its genre's index."""
    chunks, genres = [], []
    for genre, play in split_plays()[split]:
        data = (plays_directory() / genre / f"{play}.md").read_bytes()
        for start in range(0, len(data) - PASSAGE_BYTES + 1, PASSAGE_BYTES):
            chunks.append(data[start : start + PASSAGE_BYTES].decode("utf-8", "ignore"))
            genres.append(GENRES.index(genre))
    return chunks, genres


def passages(split: str, count: int, seed: int) -> tuple[list[str], np.ndarray]:
    """`count` seeded 256-byte passages (non-overlapping chunks) of the split's plays.

    Returns:
      (the passages, the index in `GENRES` of each one's play's genre).
    """
    chunks, genres = play_chunks(split)
    chosen = np.random.default_rng(seed).choice(len(chunks), size=count, replace=False)
    return [chunks[i] for i in chosen], np.asarray(genres)[chosen]


def fit_probe(train, validation) -> tuple[LogisticRegression, float]:
    """The genre probe on float embeddings: C in `PROBE_C` with the best validation accuracy.

    Args:
      train, validation: (embeddings (N, 384), genre indices (N,)).

    Returns:
      (the probe fitted on train with the chosen C, that C); ties go to the smaller C.
    """
    best = None
    for c in PROBE_C:
        probe = LogisticRegression(C=c, max_iter=2000).fit(*train)
        accuracy = probe.score(*validation)
        if best is None or accuracy > best[0]:
            best = (accuracy, c, probe)
    return best[2], best[1]


def padded_ids(encoder, texts, length: int) -> np.ndarray:
    """Token ids (N, length) of texts, truncated and padded with the encoder's pad id.

    One segment per text, so every token type is 0 (the encoder's default).
    """
    ids, _ = encoder.tokenize(texts, length)
    pad = np.full((len(ids), length - ids.shape[1]), encoder.module.pad_id, np.int32)
    return np.concatenate([ids, pad], 1)


def token_batches(encoder, texts, length: int = MAX_TOKENS, batch: int = BATCH):
    """`padded_ids` in device batches of `batch` rows."""
    ids = padded_ids(encoder, texts, length)
    return [jnp.asarray(ids[i : i + batch]) for i in range(0, len(ids), batch)]


def embeddings(forward, batches) -> np.ndarray:
    out = np.concatenate([np.asarray(forward(b)) for b in batches])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def compare(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    cosine = np.sum(reference * other, axis=1)

    def neighbours(e):
        similarity = e @ e.T
        np.fill_diagonal(similarity, -np.inf)
        return similarity.argmax(axis=1)

    return {
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "nn_agreement": float(np.mean(neighbours(reference) == neighbours(other))),
    }


def rows():
    w4 = {g: QuantSpec(bits=4, axes=(-1,), group_size=g) for g in (64, 128)}
    w3 = QuantSpec(bits=3, axes=(-1,), group_size=128)
    weight_only = [
        ("W4 g64", w4[64]),
        ("W4 g128", w4[128]),
        ("W3 g128", w3),
    ]
    methods = {
        "rtn": PTQMethod(),
        "gptq": PTQMethod(weights="gptq"),
        "awq": PTQMethod(scaling="awq"),
        "rotate+gptq": PTQMethod(weights="gptq", rotate=True),
    }
    for label, spec in weight_only:
        for name, method in methods.items():
            yield label, name, QuantRecipe(weight_rules=((LAYERS, spec),)), method
    w8a8 = QuantRecipe(
        weight_rules=((LAYERS, QuantSpec(bits=8, axes=(-1,))),),
        act_rules=((r"layer_\d+/.*", QuantSpec(bits=8, axes=(0, 1))),),
        act_mode="dynamic",
    )
    for name, method in {
        "rtn": PTQMethod(),
        "smoothquant": PTQMethod(scaling="smoothquant"),
        "rotate+rtn": PTQMethod(rotate=True),
    }.items():
        yield "W8A8", name, w8a8, method


def format_table(report: dict) -> str:
    """The README table of a report: one row per (recipe, method), the float probe first."""
    probe = report["probe"]
    lines = [
        f"{'recipe':<9}{'method':<14}{'mean cos':>9}{'min cos':>9}{'NN agree':>10}"
        f"{'genre acc':>10}{'calib s':>9}",
        f"{'float':<9}{'':<14}{1:>9.4f}{1:>9.4f}{1:>10.3f}{probe['float_test_accuracy']:>10.3f}"
        f"{0:>9.1f}",
    ]
    for row in report["rows"]:
        lines.append(
            f"{row['recipe']:<9}{row['method']:<14}{row['mean_cosine']:>9.4f}"
            f"{row['min_cosine']:>9.4f}{row['nn_agreement']:>10.3f}{row['probe_accuracy']:>10.3f}"
            f"{row['calibration_s']:>9.1f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ptq_minilm", help="output directory")
    parser.add_argument("--calibration", type=int, default=64, help="validation passages")
    parser.add_argument("--evaluation", type=int, default=256, help="test passages")
    parser.add_argument("--probe_train", type=int, default=512, help="probe's train passages")
    parser.add_argument("--probe_validation", type=int, default=256, help="probe's C selection")
    parser.add_argument("--seed", type=int, default=0, help="passage sampling seed")
    return parser.parse_args(argv)


def probe_report(encoder, float_forward, args, test_embeddings, test_genres):
    """(the probe fitted on float embeddings, the report's "probe" entry)."""
    labelled = {}
    for split, count, seed in (
        ("train", args.probe_train, args.seed),
        ("validation", args.probe_validation, args.seed + 1),
    ):
        texts, genres = passages(split, count, seed)
        labelled[split] = (embeddings(float_forward, token_batches(encoder, texts)), genres)
    probe, c = fit_probe(labelled["train"], labelled["validation"])
    counts = np.bincount(test_genres, minlength=len(GENRES))
    return probe, {
        "C": c,
        "train_passages": args.probe_train,
        "validation_passages": args.probe_validation,
        "validation_accuracy": float(probe.score(*labelled["validation"])),
        "float_test_accuracy": float(probe.score(test_embeddings, test_genres)),
        "chance_majority": float(counts.max() / counts.sum()),
        "chance_uniform": 1 / len(GENRES),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    encoder = load_pretrained("all-MiniLM-L6-v2")
    module, variables = encoder.module, encoder.variables
    calibration = token_batches(encoder, passages("validation", args.calibration, args.seed)[0])
    test_texts, test_genres = passages("test", args.evaluation, args.seed)
    evaluation = token_batches(encoder, test_texts)
    float_forward = jax.jit(lambda ids: module.apply(variables, ids))
    reference = embeddings(float_forward, evaluation)
    probe, probe_entry = probe_report(encoder, float_forward, args, reference, test_genres)
    print(json.dumps(probe_entry), flush=True)
    forward = jax.jit(lambda q, ids: fake_quant_apply(module, q, ids))
    results = []
    for label, name, recipe, method in rows():
        start = time.perf_counter()
        qmodel, _ = layerwise_ptq(module, variables, calibration, recipe, method, progress=False)
        seconds = time.perf_counter() - start
        row = {"recipe": label, "method": name, "calibration_s": round(seconds, 2)}
        quantized = embeddings(functools.partial(forward, qmodel), evaluation)
        row.update(compare(reference, quantized))
        row["probe_accuracy"] = float(probe.score(quantized, test_genres))
        results.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    report = {
        "model": "all-MiniLM-L6-v2",
        "calibration_passages": args.calibration,
        "evaluation_passages": args.evaluation,
        "passage_bytes": PASSAGE_BYTES,
        "max_tokens": MAX_TOKENS,
        "probe": probe_entry,
        "rows": results,
    }
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
