"""A BERT-style encoder that tells which genre a 256-byte passage of Shakespeare comes from.

`encoder_tiny` (post-norm, learned positions, exact GELU, mean pooling) over
the bytes of each passage, six classes (comedies, histories, problem plays,
Roman plays, romances, tragedies); the validation and test plays are unseen
in training (`kdq.data.shakespeare`), so the classifier must recognise a
genre from the style of plays it has never read. Chance: 1/6, and the test
split's majority-class rate (its report's `genre_chance`).
"""

from kdq.train import default_config


def get_config():
    config = default_config()
    config.dataset = "shakespeare_genre"
    config.task = "text_classification"
    config.model.name = "encoder_tiny"
    config.model.options = {"pooling": "mean"}
    config.batch_size = 32
    config.eval_batch_size = 128
    config.num_steps = 600
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 0.01
    config.optimizer.warmup_steps = 50
    config.optimizer.grad_clip_norm = 1.0
    return config
