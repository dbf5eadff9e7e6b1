"""The repair as a preprocessing defence of the Adversarial Robustness Toolbox (ART, the ``art`` extra).

``RepairPreprocessor`` is a ``PreprocessorPyTorch``: ``PyTorchClassifier(..., preprocessing_defences=[it])`` runs
the repair before the classifier on every prediction, and ART's attacks then attack the defended model. Gradients
are BPDA's (Athalye et al., ICML 2018): the repair's value, the identity's gradient — in ``forward`` itself, since
ART's PyTorch estimators differentiate through ``forward`` when every defence is a PyTorch one, and in
``estimate_forward`` for the other path. ART calls ``forward`` under ``torch.no_grad()`` for predictions; the repair
turns autograd on for its own loop (``engine.defended.Purifier``).

Example::

    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier
    from engine import load_pipeline
    from engine.art_defence import RepairPreprocessor

    p = load_pipeline()
    clf = PyTorchClassifier(p.classifier, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 32, 32),
                            nb_classes=10, clip_values=(0, 1),
                            preprocessing_defences=[RepairPreprocessor(p, steps=10)])
    x_adv = ProjectedGradientDescent(clf, eps=8/255, eps_step=2/255, max_iter=20).generate(x)  # x: N×3×32×32 (CIFAR)
"""
from __future__ import annotations

from typing import Any

import torch

try:
    from art.defences.preprocessor.preprocessor import PreprocessorPyTorch
except ImportError as e:                                   # the optional extra
    raise ImportError("engine.art_defence needs the Adversarial Robustness Toolbox: "
                      "pip install 'mssl-repair[art]' (or adversarial-robustness-toolbox)") from e

from runtime.settings import DEFAULTS

from .defended import Purifier


class RepairPreprocessor(PreprocessorPyTorch):
    """x N×3×S×S float in [0, 1] -> (repaired x, y unchanged); applied on predictions (and, with
    ``apply_fit=True``, before training). ``eps``, ``steps``, ``step_size``, ``seed``: the repair's."""

    def __init__(self, pipeline, eps: float = DEFAULTS.eps, steps: int = DEFAULTS.steps,
                 step_size: float = DEFAULTS.step_size, seed: int = DEFAULTS.seed,
                 apply_fit: bool = False, apply_predict: bool = True) -> None:
        super().__init__(device_type=pipeline.device.type, is_fitted=True, apply_fit=apply_fit,
                         apply_predict=apply_predict)
        self.purifier = Purifier(pipeline, bpda=True, eps=eps, steps=steps, step_size=step_size, seed=seed)

    def forward(self, x: torch.Tensor, y: Any | None = None) -> tuple[torch.Tensor, Any | None]:
        return self.purifier(x), y

    def estimate_forward(self, x: torch.Tensor, y: Any | None = None) -> torch.Tensor:
        return x                                           # BPDA: the identity's gradient

    def fit(self, x, y=None, **kwargs) -> None:
        """Nothing to fit: the repair's networks are trained already."""
