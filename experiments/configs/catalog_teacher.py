"""A float model trained with cross-entropy on CIFAR-10, CIFAR-100 or ImageNet.

The argument is "<dataset>,<model>":

    --config=experiments/configs/catalog_teacher.py:cifar100,resnet32x4 \
        --workdir=runs/cifar100_resnet32x4

These runs are the teachers the distillation configs load and the float
models post-training quantization starts from; those configs expect them in
runs/<dataset>_<model>.

Every recipe trains with SGD, momentum 0.9, weight decay on every parameter
(PyTorch's coupled L2), no warm-up, the dataset's standard augmentation
(CIFAR: 4-pixel padded random crop + flip; ImageNet: Inception crop + flip at
224, evaluated on the 224 centre crop of the image resized to 256) and
per-channel mean/std normalisation. An epoch is `train examples // batch
size` steps (the input pipeline drops the last partial batch). Two
differences hold for every recipe: kdq's SGD uses Nesterov momentum where the
sources use plain momentum, and kdq's schedules are cosine or constant, so
cosine decay to zero over the whole run replaces the sources' step or
exponential decays. The recipes:

* CIFAR-10/100, RepDistiller's CIFAR models (resnet8 .. resnet110,
  resnet8x4, resnet32x4, wrn_16_2, wrn_40_2): RepDistiller's
  `train_teacher.py` (Tian et al. 2020, HobbitLong/RepDistiller): 240
  epochs, batch 64, lr 0.05 (divided by 10 at epochs 150, 180 and 210 there),
  weight decay 5e-4.
* CIFAR-10/100, resnet18 / resnet34 / resnet50 with `cifar_stem=True`:
  kuangliu/pytorch-cifar's `main.py`: 200 epochs, batch 128, lr 0.1 with
  cosine annealing over the 200 epochs, weight decay 5e-4.
* ImageNet, resnet18 / resnet34 / resnet50: torchvision's classification
  reference recipe (pytorch/vision `references/classification`, the one its
  ResNet weights were trained with): 90 epochs, batch 256 (32 per GPU on 8
  GPUs), lr 0.1 (divided by 10 every 30 epochs there), weight decay 1e-4.
* ImageNet, mobilenet_v2 / mobilenet_v3_small / mobilenet_v3_large:
  torchvision's MobileNetV2 recipe: 300 epochs, batch 256, lr 0.036
  (multiplied by 0.98 every epoch there), weight decay 4e-5, dropout 0.2
  before the classifier. torchvision trains MobileNetV3 differently (RMSProp,
  AutoAugment, random erasing, weight EMA, 600 epochs, batch 1024); kdq has
  none of these, so the MobileNetV2 SGD recipe is used for MobileNetV3 too.
"""

from kdq.train import default_config

TRAIN_EXAMPLES = {"cifar10": 50_000, "cifar100": 50_000, "imagenet2012": 1_281_167}

CIFAR_MODELS = (
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "wrn_16_2",
    "wrn_40_2",
)
RESNETS = ("resnet18", "resnet34", "resnet50")
MOBILENETS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")


def steps_for(dataset: str, epochs: int, batch_size: int) -> int:
    """Optimizer steps of `epochs` passes over the train split (last partial batch dropped)."""
    return epochs * (TRAIN_EXAMPLES[dataset] // batch_size)


def _recipe(dataset: str, model: str) -> dict:
    """(epochs, batch size, lr, weight decay, model options) of the recipe for this pair."""
    if dataset in ("cifar10", "cifar100"):
        if model in CIFAR_MODELS:
            return {"epochs": 240, "batch_size": 64, "lr": 0.05, "wd": 5e-4, "options": {}}
        if model in RESNETS:
            options = {"cifar_stem": True}
            return {"epochs": 200, "batch_size": 128, "lr": 0.1, "wd": 5e-4, "options": options}
        known = CIFAR_MODELS + RESNETS
    elif dataset == "imagenet2012":
        if model in RESNETS:
            return {"epochs": 90, "batch_size": 256, "lr": 0.1, "wd": 1e-4, "options": {}}
        if model in MOBILENETS:
            options = {"dropout": 0.2}
            return {"epochs": 300, "batch_size": 256, "lr": 0.036, "wd": 4e-5, "options": options}
        known = RESNETS + MOBILENETS
    else:
        raise ValueError(
            f"catalog_teacher: dataset must be one of {sorted(TRAIN_EXAMPLES)}, got {dataset!r}"
        )
    raise ValueError(
        f"catalog_teacher has no {dataset} recipe for model {model!r}; models: {list(known)}"
    )


def get_config(arg: str = "cifar100,resnet32x4"):
    dataset, _, model = arg.partition(",")
    recipe = _recipe(dataset, model)
    config = default_config()
    config.dataset = dataset
    config.model.name = model
    config.model.options = recipe["options"]
    config.normalize = True
    config.augment.standard = True
    if dataset == "imagenet2012":
        config.image_size = 224
    config.batch_size = recipe["batch_size"]
    config.num_steps = steps_for(dataset, recipe["epochs"], recipe["batch_size"])
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.9
    config.optimizer.learning_rate = recipe["lr"]
    config.optimizer.weight_decay = recipe["wd"]
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 0
    config.log_every = 100
    # One checkpoint per epoch.
    config.checkpoint_every = TRAIN_EXAMPLES[dataset] // recipe["batch_size"]
    return config
