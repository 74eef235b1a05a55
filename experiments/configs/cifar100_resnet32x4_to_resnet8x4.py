"""resnet32x4 -> resnet8x4 on CIFAR-100, the benchmark pair of RepDistiller and mdistiller.

The argument picks the objective:

    --config=experiments/configs/cifar100_resnet32x4_to_resnet8x4.py:kd
    --config=experiments/configs/cifar100_resnet32x4_to_resnet8x4.py:dkd

* "kd": Hinton et al. 2015 as in RepDistiller's table (Tian et al. 2020,
  HobbitLong/RepDistiller `train_student.py --distill kd -r 0.1 -a 0.9 -b 0`):
  0.1 cross-entropy + 0.9 KD at T = 4 (KL scaled by T^2).
* "dkd": decoupled KD (Zhao et al. 2022) as in mdistiller's CIFAR-100 setting
  (megvii-research/mdistiller `configs/cifar100/dkd/res32x4_res8x4.yaml` and
  its DKD defaults): cross-entropy of weight 1 + DKD with alpha = 1 (TCKD),
  beta = 8 (NCKD), T = 4. mdistiller ramps the DKD weight linearly from 0 to 1
  over the first 20 epochs; kdq's loss weights are constant, so DKD has its
  full weight from the first step.

Both use the recipe of the two repositories (RepDistiller's and mdistiller's
CIFAR-100 solver settings agree): 240 epochs, batch 64, SGD momentum 0.9, lr
0.05, weight decay 5e-4 (see `catalog_teacher`). They divide the lr by 10 at
epochs 150, 180 and 210; kdq's schedules are cosine or constant, so the lr
decays along a cosine to 0 instead, and kdq's SGD uses Nesterov momentum
where they use plain momentum. The teacher is the run of
`catalog_teacher.py:cifar100,resnet32x4` (`--config.teacher.workdir`,
default runs/cifar100_resnet32x4).
"""

from experiments.configs import catalog_teacher

OBJECTIVES = {
    "kd": {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4.0}},
    "dkd": {
        "ce": {"weight": 1.0},
        "dkd": {"weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0},
    },
}


def get_config(arg: str = "kd"):
    if arg not in OBJECTIVES:
        raise ValueError(f"config argument must be one of {sorted(OBJECTIVES)}, got {arg!r}")
    config = catalog_teacher.get_config("cifar100,resnet8x4")
    teacher = catalog_teacher.get_config("cifar100,resnet32x4")
    config.teacher.name = teacher.model.name
    config.teacher.options = teacher.model.options
    config.teacher.workdir = "runs/cifar100_resnet32x4"
    config.losses = OBJECTIVES[arg]
    return config
