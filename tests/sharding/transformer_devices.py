"""Runs under 8 simulated CPU devices (see transformer_sharding_test.py): a gradient step
of a tiny transformer LM with params placed by each `kdq.sharding.PARAM_RULES` strategy
against the same step on one device.

Prints one JSON line: per (strategy, data x model) mesh, the relative differences of the
loss, the gradients and the updated params, and the partition spec, shard shape and
shape of every placed param and updated param.
"""

import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from kdq.models import create_model  # noqa: E402
from kdq.rules import tree_paths  # noqa: E402
from kdq.sharding import PARAM_RULES, make_mesh, shard_batch, tree_shardings  # noqa: E402

# (strategy, data-parallel size, model-parallel size)
MESHES = [("fsdp", 8, 1), ("fsdp", 2, 4), ("tensor", 2, 4)]
BATCH, SEQ_LEN, VOCAB = 8, 8, 64
LEARNING_RATE = 0.1


def tiny_lm():
    """A one-block LM with grouped-query attention (4 heads, 2 key-value heads), untied head."""
    return create_model(
        "transformer_lm",
        num_classes=VOCAB,
        num_layers=1,
        d_model=16,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=32,
        max_len=SEQ_LEN,
        tie_embeddings=False,
    )


def next_token_batch():
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(BATCH, SEQ_LEN + 1))
    tokens = tokens.astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


def make_step(model, param_shardings=None):
    """loss, grads and params - lr * grads, jitted; sharded outputs placed like the params."""

    def step(params, batch):
        def loss_fn(params):
            logits = model.apply({"params": params}, batch["tokens"])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), batch["targets"]
            ).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        return loss, grads, jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)

    if param_shardings is None:
        return jax.jit(step)
    return jax.jit(step, out_shardings=(None, param_shardings, param_shardings))


def rel_diff(a, b):
    """max over leaves of max|a - b| / max|b|: the error relative to each leaf's scale."""
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def placement(tree):
    """{path: [spec padded to the leaf's rank, local shard shape, global shape]}."""
    out = {}
    for path, leaf in zip(tree_paths(tree), jax.tree.leaves(tree), strict=True):
        spec = list(leaf.sharding.spec) + [None] * (leaf.ndim - len(leaf.sharding.spec))
        spec = [list(s) if isinstance(s, tuple) else s for s in spec]
        out[path] = [spec, list(leaf.addressable_shards[0].data.shape), list(leaf.shape)]
    return out


def main():
    assert jax.device_count() == 8, jax.devices()
    model, batch = tiny_lm(), next_token_batch()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["tokens"])["params"]
    reference = make_step(model)(params, batch)
    results = {}
    for strategy, data, model_parallel in MESHES:
        mesh = make_mesh(data * model_parallel, model_parallel)
        shardings = tree_shardings({"params": params}, mesh, PARAM_RULES[strategy])["params"]
        placed = jax.device_put(params, shardings)
        loss, grads, updated = make_step(model, shardings)(placed, shard_batch(batch, mesh))
        results[f"{strategy}/{data}x{model_parallel}"] = {
            "loss": abs(float(loss) - float(reference[0])) / abs(float(reference[0])),
            "grads": rel_diff(grads, reference[1]),
            "params": rel_diff(updated, reference[2]),
            "placed": placement(placed),
            "updated": placement(updated),
        }
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
