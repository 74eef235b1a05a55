"""Distillation of the pretrained all-MiniLM-L6-v2 into a shallower sentence encoder.

    python -m experiments.distill_minilm --out=runs/distill_minilm

The student is the teacher's architecture with `--layers` (default 3) of its
six layers: its embeddings and layer i start as copies of the teacher's
embeddings and layer m(i) = round((i + 1) 6 / L) - 1 (layers 1, 3, 5 for
L = 3). It trains on unlabelled 256-byte passages of the train plays (every
non-overlapping chunk, at most `MAX_TOKENS` tokens), in one jitted step that
runs the teacher and the student, on

    loss = mean_b ||e_s - e_t||^2 + w_rel sum_{a in q,k,v} mean_valid tokens l_a,

e = f / ||f|| the sentence embedding of mean-pooled features f (so the first
term is 2 (1 - cos(e_s, e_t))), and l_a MiniLMv2's attention-relation loss
(`kdq.distill.attention_relation_loss`, 12 relation heads) between the
query/key/value projections of the student's last layer and the teacher's
last layer, over the non-padding tokens. AdamW, warm-up then cosine decay,
gradients clipped at norm 1; each peak learning rate of `--learning_rates`
is a run of its own.

Evaluated every `--eval_every` steps by the cosine of student to teacher
embeddings on validation passages; the (learning rate, step) with the best
validation cosine is the one reported, with its cosine and nearest-neighbour
agreement on test passages (the 256 test passages of `experiments.ptq_minilm`).
The teacher's validation and test embeddings are computed once and cached in
<out>/teacher_embeddings.npz. Also reported: the copied student before
training, the parameter counts (4 bytes each in float32), and the forward
time of a batch of 64 test passages for teacher and student, timed side by
side (`experiments.bench.common.time_interleaved`). Writes <out>/report.json;
`experiments/results/distill_minilm_report.json` is one such report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench.common import time_interleaved
from experiments.ptq_minilm import (
    compare,
    embeddings,
    padded_ids,
    passages,
    play_chunks,
    token_batches,
)
from kdq.distill import attention_relation_loss
from kdq.distill.taps import apply_with_taps
from kdq.models import count_params, load_pretrained

MAX_TOKENS = 96
PROJECTIONS = ("q", "k", "v")
RELATION_HEADS = 12
SPEED_BATCH = 64


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """m(i) = round((i + 1) Lt / Ls) - 1: the teacher layer each student layer starts from."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def student_from_teacher(encoder, num_layers: int):
    """(student module, its variables copied from the teacher's, the layer map)."""
    teacher = encoder.module
    mapping = layer_map(teacher.num_layers, num_layers)
    params = encoder.variables["params"]
    copied = {k: v for k, v in params.items() if not k.startswith("layer_")}
    copied |= {f"layer_{i}": params[f"layer_{m}"] for i, m in enumerate(mapping)}
    return teacher.clone(num_layers=num_layers), {"params": copied}, mapping


def train_passages() -> list[str]:
    """Every non-overlapping 256-byte chunk of the train plays."""
    return play_chunks("train")[0]


def unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def make_step(student, teacher, tx, relation_weight: float):
    """The jitted step (params, opt_state, teacher variables, ids) -> (.., metrics)."""
    last = {"student": student.num_layers - 1, "teacher": teacher.num_layers - 1}
    taps = {name: [f"layer_{i}/attn/{p}" for p in PROJECTIONS] for name, i in last.items()}

    def loss_fn(params, teacher_variables, ids):
        keep = ids != student.pad_id
        s_pooled, s_feats, _ = apply_with_taps(
            student, {"params": params}, ids, taps=taps["student"]
        )
        t_pooled, t_feats, _ = apply_with_taps(
            teacher, teacher_variables, ids, taps=taps["teacher"]
        )
        t_pooled, t_feats = jax.lax.stop_gradient((t_pooled, t_feats))
        embedding = jnp.mean(jnp.sum((unit(s_pooled) - unit(t_pooled)) ** 2, axis=-1))
        relation = 0.0
        for s_tap, t_tap in zip(taps["student"], taps["teacher"], strict=True):
            per_token = attention_relation_loss(
                s_feats[s_tap], t_feats[t_tap], num_relation_heads=RELATION_HEADS, where=keep
            )
            relation += jnp.sum(per_token) / jnp.sum(keep)
        loss = embedding + relation_weight * relation
        return loss, {"loss": loss, "embedding_mse": embedding, "relation": relation}

    @jax.jit
    def step(params, opt_state, teacher_variables, ids):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, teacher_variables, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def student_embeddings(forward, params, batches) -> np.ndarray:
    """Unit embeddings of token batches by `forward(params, ids)`."""
    return embeddings(lambda ids: forward(params, ids), batches)


def teacher_embeddings(path, teacher_forward, held_out) -> dict[str, np.ndarray]:
    """The teacher's embeddings of each held-out split, cached at `path`."""
    if os.path.exists(path):
        with np.load(path) as cached:
            if set(cached.files) == set(held_out):
                return {k: cached[k] for k in held_out}
    computed = {k: embeddings(teacher_forward, v) for k, v in held_out.items()}
    np.savez(path, **computed)
    return computed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/distill_minilm", help="output directory")
    parser.add_argument("--layers", type=int, default=3, help="student layers")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--learning_rates",
        type=float,
        nargs="+",
        default=[1e-4, 3e-4],
        help="peak learning rates tried; the best on validation is reported",
    )
    parser.add_argument("--warmup_steps", type=int, default=30)
    parser.add_argument("--relation_weight", type=float, default=1.0)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--validation", type=int, default=256, help="validation passages")
    parser.add_argument("--evaluation", type=int, default=256, help="test passages")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def speed(teacher, teacher_variables, student, params, ids) -> dict[str, float]:
    """Median ms per forward of the batch `ids` for teacher and student, sampled side by side."""
    run = {
        "teacher": jax.jit(lambda x: teacher.apply(teacher_variables, x)),
        "student": jax.jit(lambda x: student.apply({"params": params}, x)),
    }
    samples, _ = time_interleaved({k: (lambda f=f: f(ids)) for k, f in run.items()}, repeats=15)
    ms = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    ratios = [a / b for a, b in zip(samples["teacher"], samples["student"], strict=True)]
    return {
        "teacher_ms": ms["teacher"],
        "student_ms": ms["student"],
        "speedup": statistics.median(ratios),
    }


def train(
    args, learning_rate, encoder, student, params, held_out, reference
) -> tuple[dict, list[dict], float]:
    """Trains; returns (the best params on validation, the evaluation log, train seconds)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, args.warmup_steps, max(args.steps, args.warmup_steps + 1)
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    step = make_step(student, encoder.module, tx, args.relation_weight)
    ids = padded_ids(encoder, train_passages(), MAX_TOKENS)
    forward = jax.jit(lambda p, x: student.apply({"params": p}, x))
    opt_state, rng = tx.init(params), np.random.default_rng(args.seed)
    order, position, log, seconds = rng.permutation(len(ids)), 0, [], 0.0
    best = (-1.0, params)
    for i in range(args.steps + 1):
        if i % args.eval_every == 0 or i == args.steps:
            cos = compare(
                reference["validation"], student_embeddings(forward, params, held_out["validation"])
            )
            log.append({"step": i, "val_mean_cosine": cos["mean_cosine"]})
            print(json.dumps(log[-1]), flush=True)
            if cos["mean_cosine"] > best[0]:
                best = (cos["mean_cosine"], params)
        if i == args.steps:
            break
        if position + args.batch_size > len(order):
            order, position = rng.permutation(len(ids)), 0
        rows = order[position : position + args.batch_size]
        position += args.batch_size
        start = time.perf_counter()
        params, opt_state, metrics = step(params, opt_state, encoder.variables, ids[rows])
        jax.block_until_ready(params)
        seconds += time.perf_counter() - start
        log[-1].setdefault("train_loss", float(metrics["loss"]))
    return best[1], log, seconds


def format_table(report: dict) -> str:
    """The README table of a report: the teacher, the copied student and the distilled one."""
    speed = report["speed"]
    lines = [
        f"{'model':<24}{'layers':>7}{'params':>9}{'val cos':>9}{'test cos':>9}{'min cos':>9}"
        f"{'NN agree':>10}{'ms/batch':>10}",
        f"{'teacher ' + report['teacher']:<24}{6:>7}{report['teacher_params'] / 1e6:>8.1f}M"
        f"{1:>9.4f}{1:>9.4f}{1:>9.4f}{1:>10.3f}{speed['teacher_ms']:>10.1f}",
    ]
    layers = ",".join(map(str, report["layer_map"]))
    for name, figures in (
        (f"copied layers {layers}", report["copied"]),
        (f"distilled, step {report['distilled']['step']}", report["distilled"]),
    ):
        lines.append(
            f"{name:<24}{report['student_layers']:>7}{report['student_params'] / 1e6:>8.1f}M"
            f"{figures['val_mean_cosine']:>9.4f}{figures['test_mean_cosine']:>9.4f}"
            f"{figures['test_min_cosine']:>9.4f}{figures['test_nn_agreement']:>10.3f}"
            f"{speed['student_ms']:>10.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    encoder = load_pretrained("all-MiniLM-L6-v2")
    teacher = encoder.module
    student, params, mapping = student_from_teacher(encoder, args.layers)
    params = params["params"]
    held_out = {
        split: token_batches(encoder, passages(split, count, seed)[0], MAX_TOKENS, SPEED_BATCH)
        for split, count, seed in (
            ("validation", args.validation, args.seed + 1),
            ("test", args.evaluation, args.seed),
        )
    }
    teacher_forward = jax.jit(lambda x: teacher.apply(encoder.variables, x))
    reference = teacher_embeddings(
        os.path.join(args.out, "teacher_embeddings.npz"), teacher_forward, held_out
    )
    forward = jax.jit(lambda p, x: student.apply({"params": p}, x))

    def evaluate(p):
        out = {}
        for split, held in held_out.items():
            figures = compare(reference[split], student_embeddings(forward, p, held))
            out |= {
                f"{'val' if split == 'validation' else split}_{k}": v for k, v in figures.items()
            }
        return out

    copied = evaluate(params)
    sweep, chosen = [], None
    for learning_rate in args.learning_rates:
        best, log, seconds = train(
            args, learning_rate, encoder, student, params, held_out, reference
        )
        top = max(log, key=lambda e: e["val_mean_cosine"])
        sweep.append(
            {"learning_rate": learning_rate, "step": top["step"], "train_seconds": seconds}
            | {"val_mean_cosine": top["val_mean_cosine"]}
        )
        if chosen is None or top["val_mean_cosine"] > chosen[0]:
            chosen = (top["val_mean_cosine"], learning_rate, best, log, seconds, top["step"])
    _, learning_rate, best, log, seconds, best_step = chosen
    report = {
        "teacher": encoder.name,
        "student_layers": args.layers,
        "layer_map": mapping,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "max_tokens": MAX_TOKENS,
        "train_passages": len(train_passages()),
        "sweep": sweep,
        "learning_rate": learning_rate,
        "train_seconds": seconds,
        "copied": copied,
        "distilled": evaluate(best) | {"step": best_step},
        "log": log,
        "teacher_params": count_params(encoder.variables["params"]),
        "student_params": count_params(best),
        "speed": speed(teacher, encoder.variables, student, best, held_out["test"][0]),
    }
    report["size_ratio"] = report["student_params"] / report["teacher_params"]
    print(json.dumps({k: report[k] for k in ("copied", "distilled", "speed", "size_ratio")}))
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
