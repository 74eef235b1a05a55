"""The language model that post-training quantization is measured on: `lm_tiny` on bytes.

`kdq.models.LMTiny` (4 blocks of width 128, 4 query / 2 key-value heads,
SwiGLU of width 384, tied embeddings; 0.82 M parameters) trained with
next-byte cross-entropy on windows of 128 bytes of the 26 training plays,
batch 32, 1,200 steps (4.9 M bytes, about 1.3 epochs; 9 minutes on 2 CPU
cores). Its widths make every projection's contraction size (128, 384) a
multiple of the PTQ group sizes 32, 64 and 128, and of a Hadamard order.
`experiments.bench.ptq_transformers` trains it once into its cache directory.
"""

from experiments.configs import shakespeare_lm_teacher


def get_config():
    config = shakespeare_lm_teacher.get_config()
    config.model.name = "lm_tiny"
    config.model.options = {}
    config.batch_size = 32
    config.num_steps = 1200
    config.optimizer.warmup_steps = 60
    config.log_every = 100
    config.checkpoint_every = 400
    return config
