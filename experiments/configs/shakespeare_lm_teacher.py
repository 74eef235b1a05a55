"""The teacher language model: a 4-layer transformer of width 64 (0.21 M parameters) on bytes.

Decoder-only (RMSNorm, RoPE, SwiGLU of width 192, grouped-query attention
with 2 key/value heads for 4 query heads of 16 dimensions, tied embeddings)
trained with next-byte cross-entropy on windows of 128 bytes of the 26
training plays (`kdq.data.shakespeare`), batch 16, for a budget the demo can
afford on 2 CPU cores (250 steps, 0.5 M bytes: an eighth of an epoch;
experiments/lm_full.py trains longer); evaluated in bits per byte on every
byte of the validation and test plays.
"""

from kdq.train import default_config

TEACHER_OPTIONS = {
    "num_layers": 4,
    "d_model": 64,
    "num_heads": 4,
    "num_kv_heads": 2,
    "mlp_dim": 192,
    "max_len": 256,
}


def get_config():
    config = default_config()
    config.dataset = "shakespeare_char"
    config.task = "language_modeling"
    config.seq_len = 128
    config.model.name = "transformer_lm"
    config.model.options = dict(TEACHER_OPTIONS)
    config.batch_size = 16
    config.eval_batch_size = 256
    config.num_steps = 250
    config.optimizer.learning_rate = 3e-3
    config.optimizer.weight_decay = 0.01
    config.optimizer.warmup_steps = 25
    config.optimizer.grad_clip_norm = 1.0
    config.log_every = 25
    config.checkpoint_every = 250
    return config
