"""What a run writes can be trusted: bad configs leave no trace, bad states are never saved."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import digits_student
from kdq.checkpoint import StateCheckpoints, load_float_variables
from kdq.data import eval_batches, load_dataset
from kdq.models import create_model
from kdq.train import NonFiniteLossError, train_and_evaluate
from kdq.train import evaluation as evaluation_lib
from kdq.train import loop as loop_lib

pytestmark = pytest.mark.slow


def _tiny(steps=5, **changes):
    config = digits_student.get_config()
    config.num_steps = steps
    config.batch_size = 32
    config.log_every = 5
    config.checkpoint_every = 5
    config.optimizer.warmup_steps = 1
    config.progress = False
    for name, value in changes.items():
        setattr(config, name, value)
    return config


class _RecordingBar(evaluation_lib.tqdm.tqdm):
    """tqdm, remembering every description it showed."""

    made = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stages = [kwargs["desc"]]
        self.made.append(self)

    def set_description(self, desc=None, refresh=True):
        self.stages.append(desc)
        super().set_description(desc, refresh)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(workdir, report, bars) of a finished 5-step float run; copy the workdir to change it."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run7")
    _RecordingBar.made = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation_lib.tqdm, "tqdm", _RecordingBar)
        report = train_and_evaluate(_tiny(), workdir)
    return workdir, report, list(_RecordingBar.made)


def _copy(finished, tmp_path):
    return shutil.copytree(finished[0], tmp_path / "run")


def _latest(workdir):
    manager = StateCheckpoints(os.path.join(workdir, "checkpoints"), keep=5, every=1)
    try:
        step = manager.latest_step()
        return step, manager.restore(step)
    finally:
        manager.close()


def test_a_failed_config_leaves_the_workdir_usable(tmp_path):
    config = _tiny()
    config.model.name = "mlpp"
    with pytest.raises(ValueError, match="unknown model name='mlpp'"):
        train_and_evaluate(config, str(tmp_path))
    config = _tiny()
    config.losses = {"ce": {"weight": 1.0}, "kd": {"weight": 0.5}}
    config.teacher.name, config.teacher.workdir = "mlp", str(tmp_path / "no_teacher")
    with pytest.raises(FileNotFoundError, match="no exported model"):
        train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")
    report = train_and_evaluate(_tiny(), str(tmp_path))
    assert report["steps"] == 5


def test_an_error_found_by_tracing_the_step_writes_no_config(tmp_path, finished):
    config = _tiny()
    config.teacher.name, config.teacher.options = "mlp", {"hidden": (32,)}
    config.teacher.workdir = finished[0]
    config.losses = {"ce": {"weight": 1.0}, "kd": {"weight": 0.5, "temperature": 0.0}}
    with pytest.raises(ValueError, match=r"loss term 'kd' \(kd\): temperature must be > 0"):
        train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")
    config.losses.kd.temperature = 2.0
    assert train_and_evaluate(config, str(tmp_path))["steps"] == 5


def test_learning_rate_inf_is_refused_before_anything_runs(tmp_path):
    config = _tiny()
    config.optimizer.learning_rate = float("inf")
    with pytest.raises(ValueError, match="config.optimizer.learning_rate must be a finite number"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_an_integer_model_that_would_overflow_int32_is_refused_before_training(tmp_path):
    # 16-bit x 16-bit products over K = 64 inputs: 64 * 2^15 * 2^15 = 2^36 > 2^31 - 1.
    config = _tiny()
    config.quant.weight_bits, config.quant.act_bits, config.quant.act_mode = 16, 16, "static"
    with pytest.raises(ValueError, match="int32 accumulator can overflow"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_garbled_config_json_names_the_file_and_what_to_do(tmp_path):
    (tmp_path / "config.json").write_text('{"seed": 0, "batch_si')
    with pytest.raises(
        ValueError, match=r"config.json is unreadable \(JSONDecodeError.*new --workdir"
    ):
        train_and_evaluate(_tiny(), str(tmp_path))


def test_resuming_with_more_steps_is_refused_but_progress_may_change(tmp_path, finished):
    workdir = str(_copy(finished, tmp_path))
    with pytest.raises(
        ValueError, match=r"fields \['num_steps'\] differ.*config.num_steps is 10 here but 5"
    ):
        train_and_evaluate(_tiny(steps=10), workdir)
    report = train_and_evaluate(_tiny(steps=5, progress=True), workdir)
    assert report["test_accuracy"] == finished[1]["test_accuracy"]


def test_edge_layers_matching_no_layer_is_refused(tmp_path):
    config = _tiny()
    config.quant.weight_bits, config.quant.edge_layers = 2, "Conv_0"
    with pytest.raises(ValueError, match=r"'Conv_0' matches no layer.*\['Dense_0', 'Dense_1'\]"):
        train_and_evaluate(config, str(tmp_path))


def _poisoning_step(poison_at):
    """make_train_step, but the state after step `poison_at` has NaN params and finite metrics."""
    real = loop_lib.make_train_step

    def make(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def step(state, teacher_variables, batch):
            state, metrics = step_fn(state, teacher_variables, batch)
            if not isinstance(state.step, jax.core.Tracer) and int(state.step) == poison_at:
                nan = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), state.params)
                state = state.replace(params=nan)
            return state, metrics

        return step

    return make


def test_a_non_finite_state_is_never_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(loop_lib, "make_train_step", _poisoning_step(10))
    with pytest.raises(
        NonFiniteLossError,
        match=r"state became NaN/inf after step 5 and by step 10.*last good checkpoint \(step 5\)",
    ):
        train_and_evaluate(_tiny(steps=20), str(tmp_path))
    step, state = _latest(tmp_path)
    assert step == 5
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["params"]))


def test_a_non_finite_checkpoint_is_not_resumed(tmp_path, finished):
    workdir = str(_copy(finished, tmp_path))
    step, state = _latest(workdir)
    state["params"] = jax.tree_util.tree_map(lambda x: np.full_like(x, np.nan), state["params"])
    manager = StateCheckpoints(os.path.join(workdir, "checkpoints"), keep=5, every=1)
    manager.save(step + 1, state, force=True)
    manager.close()
    with pytest.raises(ValueError, match=r"checkpoints/6 holds NaN/inf values.*move that step"):
        train_and_evaluate(_tiny(steps=5), workdir)


def test_one_bar_per_run_names_its_stage(finished):
    bars = finished[2]
    assert len(bars) == 1
    assert bars[0].stages == [
        f"run7: {s}" for s in ("prepare", "train", "evaluate", "export", "done")
    ]


def _accuracy(model, variables, split, dataset):
    correct = count = 0
    for batch in eval_batches(dataset, batch_size=128, split=split):
        logits = np.asarray(model.apply(variables, batch["image"]))
        mask = np.asarray(batch["mask"])
        correct += int(np.sum((logits.argmax(-1) == np.asarray(batch["label"])) & mask))
        count += int(mask.sum())
    return correct / count


def test_float_report_fields(finished):
    workdir, report, _ = finished
    with open(os.path.join(workdir, "report.json")) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    dataset = load_dataset("digits")
    model = create_model("mlp", num_classes=10, hidden=(32,))
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    variables = load_float_variables(workdir, template)
    assert report["val_accuracy"] == _accuracy(model, variables, "validation", dataset)
    assert report["test_accuracy"] == _accuracy(model, variables, "test", dataset)
    # float32 weights and biases: 4 bytes per parameter, nothing else.
    assert report["payload_bytes"] == 4 * (8 * 8 * 32 + 32 + 32 * 10 + 10) == 4 * report["params"]
    assert report["disk_bytes"] > 0
    assert report["weight_bits"] == report["act_bits"] == 32
    assert report["avg_weight_bits"] == 32
    assert set(report["provenance"]) >= {"kdq_commit", "jax_version", "device"}
    assert "test_accuracy_int" not in report
    assert not {k for k in report if "latency" in k or k == "checkpoint_bytes"}


@pytest.mark.parametrize(("act_mode", "integer"), [("static", True), ("dynamic", True)])
def test_test_accuracy_int_only_for_integer_models(act_mode, integer, tmp_path):
    config = _tiny()
    config.quant.weight_bits, config.quant.act_bits, config.quant.act_mode = 8, 8, act_mode
    report = train_and_evaluate(config, str(tmp_path))
    assert ("test_accuracy_int" in report) == integer
    assert report["weight_bits"] == report["act_bits"] == 8
    # int8 kernels with one float32 scale per output channel, float32 biases.
    kernels = 8 * 8 * 32 + 4 * 32 + 32 * 10 + 4 * 10
    assert report["payload_bytes"] >= kernels + 4 * (32 + 10)
    assert report["payload_bytes"] < 4 * report["params"] / 3
