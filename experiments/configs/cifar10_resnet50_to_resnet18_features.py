"""ResNet-50 -> ResNet-18 on CIFAR-10 (both with the CIFAR stem): FitNets hint + KD + cross-entropy.

The student trains with the CIFAR-10 ResNet-18 recipe of `catalog_teacher`
(kuangliu/pytorch-cifar: 200 epochs, batch 128, SGD lr 0.1, cosine, weight
decay 5e-4). The teacher is the ResNet-50 run of
`catalog_teacher.py:cifar10,resnet50` (`--config.teacher.workdir`, default
runs/cifar10_resnet50).

The objective follows RepDistiller's benchmark (Tian et al. 2020,
HobbitLong/RepDistiller `train_student.py`): a FitNets hint (Romero et al.
2015) of weight 100 (`--distill hint -b 100`, the mean squared error over
the teacher feature), combined with KD as RepDistiller combines a feature
objective with KD (`-a 1`: weight 1, T = 4) and cross-entropy of weight 1
(`-r 1`). The hint is the output of "layer3", the third of four stages, in
both networks: a middle layer as in FitNets, at a resolution the two share,
student (B, 8, 8, 256) and teacher (B, 8, 8, 1024). RepDistiller's default
hint is one stage earlier (`--hint_layer 2`). Other differences from
RepDistiller: its regressor is a 3x3 conv + BN + ReLU, kdq's FitNets
regressor is a learned 1x1 projection (256 -> 1024 channels); FitNets' first
stage (hint-only pre-training of the lower student layers) is not run, as
in RepDistiller.
"""

from experiments.configs import catalog_teacher


def get_config():
    config = catalog_teacher.get_config("cifar10,resnet18")
    teacher = catalog_teacher.get_config("cifar10,resnet50")
    config.teacher.name = teacher.model.name
    config.teacher.options = teacher.model.options
    config.teacher.workdir = "runs/cifar10_resnet50"
    config.losses = {
        "ce": {"weight": 1.0},
        "kd": {"weight": 1.0, "temperature": 4.0},
        "fitnets": {"weight": 100.0, "student": "layer3", "teacher": "layer3"},
    }
    return config
