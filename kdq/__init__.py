"""kdq: quantization, pruning and knowledge distillation over Flax param pytrees."""

__version__ = "0.1.0"
