"""ResNet-34 -> ResNet-18 on ImageNet with KD, torchdistill's reference setting.

torchdistill (Matsubara 2021, yoshitomo-matsubara/torchdistill
`configs/official/ilsvrc2012/yoshitomo-matsubara/rrpr2020/kd-resnet18_from_resnet34.yaml`):
KD at T = 1 with alpha = 0.5, i.e. 0.5 cross-entropy + 0.5 KL(teacher ||
student); 100 epochs, batch 256, SGD momentum 0.9, lr 0.1, weight decay 1e-4,
Inception crop + flip at 224, evaluation on the 224 centre crop of the image
resized to 256. torchdistill divides the lr by 10 at epochs 30, 60 and 90;
kdq's schedules are cosine or constant, so the lr decays along a cosine to 0
instead, and kdq's SGD uses Nesterov momentum where torchdistill uses plain
momentum. torchdistill's teacher is torchvision's pretrained ResNet-34; here
it is the run of `catalog_teacher.py:imagenet2012,resnet34` (torchvision's
recipe, `--config.teacher.workdir`, default runs/imagenet2012_resnet34).
"""

from experiments.configs import catalog_teacher


def get_config():
    config = catalog_teacher.get_config("imagenet2012,resnet18")
    config.num_steps = catalog_teacher.steps_for("imagenet2012", 100, config.batch_size)
    teacher = catalog_teacher.get_config("imagenet2012,resnet34")
    config.teacher.name = teacher.model.name
    config.teacher.options = teacher.model.options
    config.teacher.workdir = "runs/imagenet2012_resnet34"
    config.losses = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 1.0}}
    return config
