"""The self-supervised tasks. Each one is an ``nn.Module`` holding its network, with

- ``sample_params(batch, generator) -> dict[str, Tensor]``: every random choice of the loss, and
- ``loss(x, **params) -> Tensor[B]``: deterministic, one loss per image, differentiable in x.
"""
from .contrastive import ContrastiveTask
from .inpainting import InpaintingTask
from .rotation import RotationTask

TASKS = {"contrastive": ContrastiveTask, "inpainting": InpaintingTask, "rotation": RotationTask}
# The same losses on heads of the classifier's backbone (engine/heads.py): same task, other network.
TASKS.update({f"{name}-head": task for name, task in list(TASKS.items())})

__all__ = ["TASKS", "ContrastiveTask", "InpaintingTask", "RotationTask"]
