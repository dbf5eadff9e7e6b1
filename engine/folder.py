"""Repair a folder of images with the PyTorch engine: runtime/folder.py's contract (outputs, report, every
bad-input rule), with this pipeline's batch repair."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from runtime import folder
from runtime.decode_policy import MAX_PIXELS
from runtime.settings import RepairSettings

from .imageio import quantize
from .models.provenance import is_preview
from .pipeline import Pipeline


def report_config(pipeline: Pipeline, settings: RepairSettings) -> dict:
    """What the report records of the repair: enough to tell two runs' settings apart."""
    gate = pipeline.gate
    return {
        **settings.record(), "size": pipeline.size, "backend": pipeline.backend.name, "tasks": pipeline.tasks,
        "alpha": [pipeline.objective.alpha[t] for t in pipeline.tasks], "device": str(pipeline.device),
        "objective": "plain" if pipeline.objective.levels is None else "clean", "levels": pipeline.objective.levels,
        "gate": None if gate is None else {"fpr": gate.fpr, "tasks": gate.tasks, "threshold": gate.threshold},
        "weights": {name: m["sha256"] for name, m in pipeline.manifests.items()},
        "classifier": pipeline.manifests["classifier"].get("source", "weights"),
        **({"preview": True} if is_preview(pipeline.manifests) else {})}      # a --profile quick set


def repair_folder(pipeline: Pipeline, input_dir: Path, output_dir: Path, settings: RepairSettings, *,
                  resize: bool = False, overwrite: bool = False, progress: bool = True, resume: bool = False,
                  max_pixels: int = MAX_PIXELS, scheduler: str = "static") -> dict:
    """Repair every readable image under ``input_dir``; returns the report (also written to ``output_dir``).
    ``resume``: finish a stopped run of the same settings; ``max_pixels``: the decode policy's limit. The pipeline's
    gate, if any, is the one it was loaded with (``settings.gate_fpr`` is what was asked of it). ``scheduler``
    "continuous": ``settings.batch_size`` images in the loop at once, joining as others leave (runtime/scheduler.py)."""
    if scheduler == "continuous":
        from runtime.scheduler import SteppedRepair

        from .stepper import TorchStepKernel

        repair = SteppedRepair(TorchStepKernel(pipeline), settings, settings.batch_size)
    else:
        repair = lambda x: repair_batch(pipeline, torch.from_numpy(x), settings)     # noqa: E731
    return folder.repair_folder(repair, input_dir,
                                output_dir, report_config(pipeline, settings), settings.batch_size, resize=resize,
                                overwrite=overwrite, progress=progress, resume=resume, max_pixels=max_pixels,
                                class_folders=pipeline.inputs["classes"])


@dataclass
class BatchRepairFactory:
    """Builds this engine's batch repair inside another process (a Ray actor): ``load()`` returns the pipeline
    (a picklable callable, e.g. a ``functools.partial`` of a loader), ``threads`` sets torch's threads there."""
    load: Callable[[], Pipeline]
    settings: RepairSettings
    threads: int | None = None

    def __call__(self) -> folder.BatchRepair:
        if self.threads:
            torch.set_num_threads(self.threads)
        pipeline = self.load()
        return lambda x: repair_batch(pipeline, torch.from_numpy(x), self.settings)

    def kernel(self):
        """The pipeline as runtime/scheduler.py's StepKernel (continuous batching), loaded here."""
        from .stepper import TorchStepKernel

        if self.threads:
            torch.set_num_threads(self.threads)
        return TorchStepKernel(self.load())


def repair_folder_on_ray(pipeline: Pipeline, load: Callable[[], Pipeline], input_dir: Path, output_dir: Path,
                         settings: RepairSettings, *, resize: bool = False, overwrite: bool = False,
                         progress: bool = True, threads: int | None = None, resume: bool = False,
                         **ray_options) -> dict:
    """``repair_folder`` with the repair on Ray Data actors, each loading its pipeline with ``load()`` (the same
    one as ``pipeline``, which gives the report's config). ``ray_options``: address, workers, worker_cpus,
    worker_gpus, max_pixels of ``runtime.ray_folder.repair_folder_ray``."""
    from runtime.ray_folder import repair_folder_ray

    return repair_folder_ray(BatchRepairFactory(load, settings, threads), input_dir, output_dir,
                             report_config(pipeline, settings), settings.batch_size, resize=resize,
                             overwrite=overwrite, progress=progress, resume=resume,
                             class_folders=pipeline.inputs["classes"], **ray_options)


@torch.no_grad()
def repair_batch(pipeline: Pipeline, x: torch.Tensor, settings: RepairSettings) -> list[dict]:
    """Repair one batch; per image: the 8-bit repaired image and the report fields. Losses before and after use the
    same augmentation parameters (the first step's draws of each input), so the two are comparable."""
    x = x.to(pipeline.device)
    objective = pipeline.objective
    seed = settings.batch_seed()
    params = objective.sample_params(x, seed)
    before = pipeline.backend.task_losses(x, params)
    result = pipeline.repair_with_trace(x, settings.eps, settings.steps, settings.step_size, seed, losses=before,
                                        early_exit=settings.early_exit)
    repaired = quantize(result.images)
    after = pipeline.backend.task_losses(repaired, params)
    gate = {} if result.score is None else {"gate_score": [round(v, 6) for v in result.score.tolist()],
                                             "gated_out": (~result.repaired).tolist()}
    numpy = lambda losses: {t: v.cpu().numpy() for t, v in losses.items()}
    return folder.image_rows(repaired.cpu().numpy(), x.cpu().numpy(), pipeline.logits(x).cpu().numpy(),
                             pipeline.logits(repaired).cpu().numpy(), numpy(before), numpy(after),
                             objective.combine(before).cpu().numpy(), objective.combine(after).cpu().numpy(),
                             pipeline.class_names, gate, result.trace.cpu().numpy())
