"""The model zoo against reference parameter counts and feature shapes.

Reference counts are computed here from the layer shapes of the reference
PyTorch definitions (RepDistiller's resnet.py / wrn.py, torchvision's
resnet.py), counting conv and dense weights, biases, and batch-norm scale and
bias (not the running statistics), and are checked against published counts.
"""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdq.models import MODELS, create_model
from kdq.models.layers import conv

CIFAR_RESNETS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
WIDE_RESNETS = {"wrn_16_2": (16, 2), "wrn_40_2": (40, 2)}
IMAGENET_MODELS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
]

# torchvision's documented parameter counts (1000 classes).
TORCHVISION_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_small": 2_542_856,
    "mobilenet_v3_large": 5_483_032,
}


def _conv(k: int, c_in: int, c_out: int) -> int:
    return k * k * c_in * c_out


def _bn(c: int) -> int:
    return 2 * c


def _fc(c_in: int, c_out: int) -> int:
    return c_in * c_out + c_out


def cifar_resnet_reference(depth: int, num_filters, num_classes: int) -> int:
    """RepDistiller `ResNet(depth, num_filters, "basicblock")`: projection shortcuts."""
    n = (depth - 2) // 6
    total = _conv(3, 3, num_filters[0]) + _bn(num_filters[0])
    c_in = num_filters[0]
    for stage, planes in enumerate(num_filters[1:]):
        for i in range(n):
            total += _conv(3, c_in, planes) + _bn(planes) + _conv(3, planes, planes) + _bn(planes)
            if i == 0 and (stage > 0 or c_in != planes):
                total += _conv(1, c_in, planes) + _bn(planes)
            c_in = planes
    return total + _fc(c_in, num_classes)


def wide_resnet_reference(depth: int, k: int, num_classes: int) -> int:
    """RepDistiller `WideResNet(depth, num_classes, widen_factor=k)`."""
    n = (depth - 4) // 6
    total = _conv(3, 3, 16)
    c_in = 16
    for width in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += _bn(c_in) + _conv(3, c_in, width) + _bn(width) + _conv(3, width, width)
            if c_in != width:
                total += _conv(1, c_in, width)
            c_in = width
    return total + _bn(c_in) + _fc(c_in, num_classes)


def imagenet_resnet_reference(
    stage_sizes, bottleneck: bool, num_classes: int, *, stem_kernel: int = 7, width: int = 64
) -> int:
    """torchvision `ResNet(block, layers)`; `stem_kernel=3` for the CIFAR stem."""
    expansion = 4 if bottleneck else 1
    total = _conv(stem_kernel, 3, width) + _bn(width)
    c_in = width
    for stage, blocks in enumerate(stage_sizes):
        planes = width * 2**stage
        out = planes * expansion
        for i in range(blocks):
            if bottleneck:
                total += _conv(1, c_in, planes) + _conv(3, planes, planes) + _conv(1, planes, out)
                total += 2 * _bn(planes) + _bn(out)
            else:
                total += _conv(3, c_in, planes) + _conv(3, planes, planes) + 2 * _bn(planes)
            if i == 0 and (stage > 0 or c_in != out):
                total += _conv(1, c_in, out) + _bn(out)
            c_in = out
    return total + _fc(c_in, num_classes)


@functools.cache
def _cached_shapes(name: str, num_classes: int, size: int, options: tuple):
    model = create_model(name, num_classes=num_classes, **dict(options))
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    return model, x, jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def _shapes(name: str, num_classes: int, size: int, **options):
    """(model, input, variable shapes) for a batch of 2 images of `size` x `size`."""
    return _cached_shapes(name, num_classes, size, tuple(sorted(options.items())))


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def _param_count(name: str, num_classes: int, size: int = 32, **options) -> int:
    return _count(_shapes(name, num_classes, size, **options)[2]["params"])


def test_the_zoo_is_registered():
    expected = {*CIFAR_RESNETS, *WIDE_RESNETS, *IMAGENET_MODELS}
    assert expected <= set(MODELS)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", sorted(CIFAR_RESNETS))
def test_cifar_resnet_parameter_count(name, num_classes):
    depth, num_filters = CIFAR_RESNETS[name]
    expected = cifar_resnet_reference(depth, num_filters, num_classes)
    assert _param_count(name, num_classes) == expected


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", sorted(WIDE_RESNETS))
def test_wide_resnet_parameter_count(name, num_classes):
    depth, k = WIDE_RESNETS[name]
    assert _param_count(name, num_classes) == wide_resnet_reference(depth, k, num_classes)


@pytest.mark.parametrize(
    ("name", "num_classes", "options", "millions"),
    [
        # RepDistiller's CIFAR-100 models, rounded as KD papers (CRD, DKD) tabulate them.
        ("resnet20", 100, {}, 0.28),
        ("resnet56", 100, {}, 0.86),
        ("resnet110", 100, {}, 1.74),
        ("resnet8x4", 100, {}, 1.23),
        ("resnet32x4", 100, {}, 7.43),
        ("wrn_16_2", 100, {}, 0.70),
        ("wrn_40_2", 100, {}, 2.26),
        ("resnet20", 10, {}, 0.27),
        # WRN-28-10 on CIFAR-10 (Zagoruyko & Komodakis, Table 4: 36.5M).
        ("wrn_16_2", 10, {"depth": 28, "widen_factor": 10}, 36.48),
    ],
)
def test_cifar_parameter_count_matches_published_figures(name, num_classes, options, millions):
    assert round(_param_count(name, num_classes, **options) / 1e6, 2) == millions


def test_reference_formulas_reproduce_torchvision():
    assert imagenet_resnet_reference((2, 2, 2, 2), False, 1000) == 11_689_512
    assert imagenet_resnet_reference((3, 4, 6, 3), False, 1000) == 21_797_672
    assert imagenet_resnet_reference((3, 4, 6, 3), True, 1000) == 25_557_032


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_parameter_count_equals_torchvision(name):
    assert _param_count(name, 1000, size=224) == TORCHVISION_COUNTS[name]


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        # kuangliu/pytorch-cifar's ResNet18 / ResNet50 on CIFAR-10: 11,173,962 / 23,520,842.
        ("resnet18", {"cifar_stem": True}, 11_173_962),
        ("resnet50", {"cifar_stem": True}, 23_520_842),
        (
            "resnet18",
            {"cifar_stem": True},
            imagenet_resnet_reference((2, 2, 2, 2), False, 10, stem_kernel=3),
        ),
        (
            "resnet34",
            {"width": 32},
            imagenet_resnet_reference((3, 4, 6, 3), False, 10, width=32),
        ),
        (
            "resnet50",
            {"stage_sizes": (3, 4, 23, 3)},
            imagenet_resnet_reference((3, 4, 23, 3), True, 10),
        ),
    ],
)
def test_imagenet_resnet_options_parameter_count(name, options, expected):
    assert _param_count(name, 10, **options) == expected


@pytest.mark.parametrize(
    ("name", "features"),
    [("mobilenet_v2", 1280), ("mobilenet_v3_small", 1024), ("mobilenet_v3_large", 1280)],
)
def test_mobilenet_num_classes_only_changes_the_classifier(name, features):
    difference = _param_count(name, 1000) - _param_count(name, 10)
    assert difference == _fc(features, 1000) - _fc(features, 10)


def test_mobilenet_width_mult_scales_the_channels():
    model, x, variables = _shapes("mobilenet_v2", 10, 32, width_mult=0.5)
    params = variables["params"]
    # make_divisible(32 * 0.5) = 16 stem channels; the last conv keeps 1280.
    assert params["stem"]["conv"]["kernel"].shape == (3, 3, 3, 16)
    assert params["head"]["conv"]["kernel"].shape[-1] == 1280
    assert _count(params) < _param_count("mobilenet_v2", 10)


def _is_cifar(name: str) -> bool:
    return name in CIFAR_RESNETS or name in WIDE_RESNETS


@pytest.mark.parametrize("name", [*sorted(CIFAR_RESNETS), *sorted(WIDE_RESNETS), *IMAGENET_MODELS])
def test_logits_shape_and_batch_stats_update(name):
    num_classes = 10 if _is_cifar(name) else 1000
    model, x, variables = _shapes(name, num_classes, 32 if _is_cifar(name) else 224)
    assert set(variables) == {"params", "batch_stats"}
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert (logits.shape, logits.dtype) == ((2, num_classes), jnp.float32)
    logits, updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
    )
    assert logits.shape == (2, num_classes)
    assert jax.tree_util.tree_structure(updates["batch_stats"]) == jax.tree_util.tree_structure(
        variables["batch_stats"]
    )


def _features(name: str, size: int, taps, **options) -> dict[str, tuple[int, ...]]:
    """Shapes of the `__call__` outputs of the submodules whose path fully matches a tap."""
    model, x, variables = _shapes(name, 10, size, **options)

    def select(module: nn.Module, method_name: str) -> bool:
        path = "/".join(module.path)
        return method_name == "__call__" and any(re.fullmatch(t, path) for t in taps)

    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=select, mutable=["intermediates"]),
        variables,
        x,
    )
    features = {}
    for tap in taps:
        node = state["intermediates"]
        for part in tap.split("/"):
            node = node[part]
        features[tap] = node["__call__"][0].shape
    return features


@pytest.mark.parametrize(
    ("name", "size", "options", "expected"),
    [
        (
            "resnet20",
            32,
            {},
            {"layer1": (32, 32, 16), "layer2": (16, 16, 32), "layer3": (8, 8, 64)},
        ),
        (
            "resnet8x4",
            32,
            {},
            {"conv1": (32, 32, 32), "layer1": (32, 32, 64), "layer3": (8, 8, 256)},
        ),
        ("wrn_40_2", 32, {}, {"block1": (32, 32, 32), "block3": (8, 8, 128), "bn1": (8, 8, 128)}),
        (
            "resnet18",
            224,
            {},
            {"conv1": (112, 112, 64), "layer1": (56, 56, 64), "layer4": (7, 7, 512)},
        ),
        (
            "resnet50",
            224,
            {},
            {
                "layer1": (56, 56, 256),
                # ResNet v1.5: the 3x3 conv strides, the first 1x1 does not.
                "layer2/block_0/conv1": (56, 56, 128),
                "layer2/block_0/conv2": (28, 28, 128),
                "layer4": (7, 7, 2048),
            },
        ),
        ("resnet18", 32, {"cifar_stem": True}, {"layer1": (32, 32, 64), "layer4": (4, 4, 512)}),
        (
            "mobilenet_v2",
            224,
            {},
            {
                "stem": (112, 112, 32),
                "stage1": (112, 112, 16),
                "stage2": (56, 56, 24),
                "stage3": (28, 28, 32),
                "stage4": (14, 14, 96),
                "stage5": (7, 7, 320),
                "head": (7, 7, 1280),
            },
        ),
        (
            "mobilenet_v3_large",
            224,
            {},
            {
                "stage1": (112, 112, 16),
                "stage2": (56, 56, 24),
                "stage3": (28, 28, 40),
                "stage4": (14, 14, 112),
                "stage5": (7, 7, 160),
                "head": (7, 7, 960),
            },
        ),
        (
            "mobilenet_v3_small",
            224,
            {},
            {
                "stage1": (56, 56, 16),
                "stage2": (28, 28, 24),
                "stage3": (14, 14, 48),
                "stage4": (7, 7, 96),
                "head": (7, 7, 576),
            },
        ),
    ],
)
def test_stage_features_have_the_reference_shapes(name, size, options, expected):
    features = _features(name, size, list(expected), **options)
    assert features == {tap: (2, *shape) for tap, shape in expected.items()}


def test_blocks_are_tappable_inside_stages():
    shapes = _features("resnet32", 32, ["layer2/block_0", "layer3/block_4"])
    assert shapes == {"layer2/block_0": (2, 16, 16, 32), "layer3/block_4": (2, 8, 8, 64)}


def test_strided_conv_pads_like_pytorch():
    # PyTorch pads a 3x3 stride-2 conv by one on every side: on a 4x4 input the
    # first window overlaps the top/left padding (4 ones), the last one does not.
    layer = conv(1, 3, strides=2)
    params = {"params": {"kernel": jnp.ones((3, 3, 1, 1))}}
    out = layer.apply(params, jnp.ones((1, 4, 4, 1)))
    np.testing.assert_array_equal(out[0, :, :, 0], [[4.0, 6.0], [6.0, 9.0]])


def _random_variables(shapes):
    """Small random params and Linen's initial running statistics (skips compiling `init`)."""
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda leaf: 0.1 * rng.standard_normal(leaf.shape, dtype=np.float32), shapes["params"]
    )
    batch_stats = jax.tree_util.tree_map_with_path(
        lambda path, leaf: np.full(leaf.shape, path[-1].key == "var", np.float32),
        shapes["batch_stats"],
    )
    return {"params": params, "batch_stats": batch_stats}


@pytest.mark.parametrize(
    ("name", "size", "options"),
    [
        ("resnet8", 32, {}),
        ("resnet8", 32, {"dtype": jnp.bfloat16}),
        ("wrn_16_2", 32, {}),
        ("resnet18", 64, {}),
        ("mobilenet_v3_small", 64, {}),
    ],
)
def test_forward_pass_and_batch_norm_modes(name, size, options):
    model, _, shapes = _shapes(name, 5, size, **options)
    variables = _random_variables(shapes)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 3))

    @jax.jit
    def run(variables, images):
        return (
            model.apply(variables, images, train=False),
            model.apply(variables, images, train=True, mutable=["batch_stats"]),
        )

    logits, (train_logits, updates) = run(variables, images)
    assert (logits.shape, logits.dtype) == ((2, 5), jnp.float32)
    assert train_logits.shape == (2, 5)
    assert bool(jnp.all(jnp.isfinite(logits))) and bool(jnp.all(jnp.isfinite(train_logits)))
    # Batch statistics (train) and the running ones (eval) normalize differently.
    assert not np.allclose(train_logits, logits)

    # Every batch norm moves its running statistics. (A mean can stay put: a 1x1
    # conv of a batch-normalized input with no activation between has zero batch mean.)
    old = jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
    new = jax.tree_util.tree_leaves(updates["batch_stats"])
    assert len(old) == len(new)
    moved = {}
    for (path, before), after in zip(old, new, strict=True):
        norm = jax.tree_util.keystr(path[:-1])
        moved[norm] = moved.get(norm, False) or not np.allclose(before, after)
    assert all(moved.values()), [norm for norm, ok in moved.items() if not ok]


def test_bfloat16_computes_in_bfloat16_with_float32_params():
    model, x, variables = _shapes("resnet20", 10, 32, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {np.dtype("float32")}

    def run(v, x):
        return model.apply(
            v, x, capture_intermediates=lambda m, _: "/".join(m.path) == "layer3", mutable=True
        )

    logits, state = jax.eval_shape(run, variables, x)
    assert logits.dtype == jnp.float32
    assert state["intermediates"]["layer3"]["__call__"][0].dtype == jnp.bfloat16


def test_dropout_needs_an_rng_only_when_training():
    model, x, variables = _shapes("wrn_16_2", 10, 32, dropout=0.3)
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
        )
    jax.eval_shape(
        lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)}
        ),
        variables,
        x,
    )


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("resnet20", {"depth": 21}, "6n \\+ 2"),
        ("wrn_40_2", {"depth": 18}, "6n \\+ 4"),
    ],
)
def test_invalid_depth_is_rejected(name, options, match):
    with pytest.raises(ValueError, match=match):
        _shapes(name, 10, 32, **options)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_num_classes_must_be_a_positive_int(num_classes):
    with pytest.raises(ValueError, match=rf"model 'mlp' needs num_classes >= 1 .*={num_classes!r}"):
        create_model("mlp", num_classes=num_classes)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("mlp", {"hidden": (64, 0)}, r"option hidden=\(64, 0\) must be made of ints >= 1"),
        ("cnn", {"dense": -1}, r"option dense=-1 must be made of ints >= 1"),
        ("resnet18", {"width": 0}, r"option width=0 must be made of ints >= 1"),
        ("wrn_16_2", {"dropout": 1.0}, r"option dropout=1.0 must be a number in \[0, 1\)"),
        ("mobilenet_v2", {"width_mult": 0.0}, r"option width_mult=0.0 must be a finite number > 0"),
    ],
)
def test_sizes_that_build_no_network_are_refused(name, options, message):
    with pytest.raises(ValueError, match=rf"model '{name}' {message}"):
        create_model(name, num_classes=10, **options)
