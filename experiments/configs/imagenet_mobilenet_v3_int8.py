"""Int8 MobileNets on ImageNet: post-training quantization or quantization-aware fine-tuning.

The argument is "<model>,<ptq|qat>[,kd]" with <model> one of mobilenet_v3_large,
mobilenet_v3_small, mobilenet_v2:

    --config=experiments/configs/imagenet_mobilenet_v3_int8.py:mobilenet_v3_large,ptq

Both start from the float run of `catalog_teacher.py:imagenet2012,<model>`
(`--config.init_from`, default runs/imagenet2012_<model>). Weights are int8
per output channel, symmetric, scaled by their absolute maximum; the input
of every Conv and Dense layer is int8 per tensor, symmetric and signed (the
normalised image, linear-bottleneck outputs and hard-swish outputs are
negative), with static scales, so the export runs on the integer path.
torchvision's quantized MobileNets use affine uint8 activations instead;
kdq's integer path takes symmetric quantizers only. BatchNorm stays a float
op after each integer convolution rather than being folded into the weights.

* "ptq": post-training quantization, no training (run it with
  `python -m experiments.ptq`; the "qat" configs with `experiments.main`). Activation scales come
  from 32 calibration batches of 32 training images (centre crops),
  torchvision's PTQ setting (pytorch/vision
  `references/classification/train_quantization.py`, num_calibration_batches
  32, batch_size 32). Each range is the 99.99th percentile of |x|, averaged
  over the batches, which clips the rare outliers that min/max calibration
  keeps (percentile calibration as evaluated by Wu et al. 2020, "Integer
  Quantization for Deep Learning Inference"); torchvision's observer
  minimises the histogram's quantization error instead.
* "qat": quantization-aware fine-tuning of the float model, with
  torchvision's QAT settings (`references/classification/README.md`,
  quantized models): batch 256 (32 per GPU on 8 GPUs), SGD momentum 0.9, lr
  1e-4 and weight decay 1e-4 for mobilenet_v2, lr 1e-3 and weight decay 1e-5
  for MobileNetV3 (torchvision gives settings for the large model only; the
  small one uses them too). torchvision runs 90 epochs with the lr divided by
  10 every 30 and notes that training converges at about 10 epochs; this
  config runs those first 10 epochs at the constant lr. The weights are
  re-quantized from their current absolute maximum at every step (8 bits
  leave no scale worth learning); activation steps are learned with LSQ (Esser
  et al. 2020), initialised from the same percentile calibration on 4 batches,
  so ranges follow the weights as they change, as torchvision's observers do
  in its first epochs. torchvision's freezing of the observers after 4 epochs
  and of the BatchNorm statistics after 3 is not available: BatchNorm keeps
  updating its statistics throughout.
* ",kd" (qat only): the float model also teaches its quantized copy: 0.5
  cross-entropy + 0.5 KD at T = 1 (the weights and temperature of
  `imagenet_resnet34_to_resnet18`, torchdistill's ImageNet KD).
"""

from experiments.configs import catalog_teacher

MODELS = ("mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v2")
# (lr, weight decay) of torchvision's QAT recipe.
QAT_OPTIMIZER = {
    "mobilenet_v2": (1e-4, 1e-4),
    "mobilenet_v3_large": (1e-3, 1e-5),
    "mobilenet_v3_small": (1e-3, 1e-5),
}


def get_config(arg: str = "mobilenet_v3_large,ptq"):
    model, _, mode = arg.partition(",")
    mode, _, kd = mode.partition(",")
    if model not in MODELS or mode not in ("ptq", "qat") or kd not in ("", "kd"):
        raise ValueError(
            f"config argument must be '<model>,ptq', '<model>,qat' or '<model>,qat,kd' with "
            f"<model> one of {list(MODELS)}, got {arg!r}"
        )
    if kd and mode == "ptq":
        raise ValueError(f"',kd' distils during QAT; PTQ does not train (got {arg!r})")
    config = catalog_teacher.get_config(f"imagenet2012,{model}")
    config.init_from = f"runs/imagenet2012_{model}"
    config.quant.weight_bits = 8
    config.quant.per_channel = True
    config.quant.calibration = "absmax"
    config.quant.act_bits = 8
    config.quant.act_signed = True
    config.quant.act_calibration = "percentile,99.99"
    if mode == "ptq":
        config.entry_point = "ptq"
        config.quant.act_mode = "static"
        config.batch_size = 32
        config.quant.calibration_batches = 32
        return config
    config.quant.weight_mode = "calibrated"
    config.quant.act_mode = "lsq"
    config.quant.calibration_batches = 4
    config.batch_size = 256
    config.num_steps = catalog_teacher.steps_for("imagenet2012", 10, config.batch_size)
    config.optimizer.learning_rate, config.optimizer.weight_decay = QAT_OPTIMIZER[model]
    config.optimizer.schedule = "constant"
    config.optimizer.warmup_steps = 0
    if kd:
        config.teacher.name = model
        config.teacher.options = config.model.options
        config.teacher.workdir = config.init_from
        config.losses = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 1.0}}
    return config
