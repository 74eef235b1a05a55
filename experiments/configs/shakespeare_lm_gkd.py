"""On-policy distillation (GKD): half the batches are the student's own continuations.

On a generated batch the first 32 bytes of every window are real text and the
student samples the remaining 97 (the window holds 129) (temperature 1, the KV cache, one jitted
call before the train step, `kdq.train.lm`); the teacher scores them in the
train step. The loss is the generalized Jensen-Shannon divergence (beta 0.5)
between teacher and student next-byte distributions on every batch, real or
generated (Agarwal et al. 2024); no cross-entropy, since sampled bytes are not
ground truth.
"""

from experiments.configs import shakespeare_lm_kd


def get_config():
    config = shakespeare_lm_kd.get_config()
    config.losses = {"jsd": {"weight": 1.0, "beta": 0.5}}
    config.generated.source = "student"
    config.generated.fraction = 0.5
    config.generated.prompt_len = 32
    return config
