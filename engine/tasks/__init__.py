"""The self-supervised tasks. Each one is an ``nn.Module`` holding its network, with

- ``loss(x, **params) -> Tensor[B]``: deterministic, one loss per image, differentiable in x;

and every random choice of the loss an input ``params``, drawn per image by runtime/draws.py (by task name, so the
runtime without PyTorch draws the same).
"""
from .consistency import ConsistencyTask
from .contrastive import ContrastiveTask
from .hedge import HedgeTask
from .inpainting import InpaintingTask
from .rotation import RotationTask

TASKS = {"contrastive": ContrastiveTask, "inpainting": InpaintingTask, "rotation": RotationTask}
# The same losses on heads of the classifier's backbone (engine/models/heads.py): same task, other network.
TASKS.update({f"{name}-head": task for name, task in list(TASKS.items())})
# Inpainting with random patches dropped instead of the centre (runtime/draws.py's patch_mask): a network of its own.
TASKS["inpainting-patches"] = InpaintingTask
# Tasks that read the classifier itself: no weights of their own, tied to the classifier they are loaded with.
CLASSIFIER_TASKS = {"consistency": ConsistencyTask, "hedge": HedgeTask}
TASKS.update(CLASSIFIER_TASKS)
# Tasks whose draws are augmented views (their loss, and its calibration, depend on the number of views).
VIEW_TASKS = (ContrastiveTask, ConsistencyTask)

__all__ = ["TASKS", "CLASSIFIER_TASKS", "VIEW_TASKS", "ConsistencyTask", "ContrastiveTask", "HedgeTask",
           "InpaintingTask", "RotationTask"]
