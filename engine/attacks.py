"""L∞ attacks on a classifier, or on a classifier behind the repair; one small class each (torchattacks style).
Inputs are float images in [0, 1]."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .repair import Params, at_step


def random_start(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.rand(x.shape, generator=generator).to(x.device, x.dtype)
    return (x + (2 * noise - 1) * eps).clamp(0, 1)


def project(x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> torch.Tensor:
    """Back onto the ε-ball around x and onto [0, 1]."""
    return (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1).detach()


class PGD(nn.Module):
    """Projected gradient descent, L∞ (Madry et al., *Towards Deep Learning Models Resistant to Adversarial
    Attacks*, ICLR 2018): from a uniform random start in the ε-ball, ``steps`` signed-gradient ascent steps on the
    cross-entropy, each projected back onto the ball and onto [0, 1]. With ``restarts`` > 1 each image keeps the
    first restart that fools the model (else the last).

    Shapes: x N×3×H×W in [0, 1], y N (int64) -> adversarial images N×3×H×W.

    Example::

        x_adv = PGD(model, eps=8/255, alpha=2/255, steps=20)(x, y)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 20,
                 restarts: int = 1, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.model, self.eps, self.alpha, self.steps, self.restarts = model, eps, alpha, steps, restarts
        self.generator = generator

    def prepare(self, x: torch.Tensor) -> object:
        """Per-call state for ``attack_loss`` (none here)."""
        return None

    def attack_loss(self, x_adv: torch.Tensor, y: torch.Tensor, state: object) -> torch.Tensor:
        return F.cross_entropy(self.model(x_adv), y, reduction="sum")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        best = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            x_adv = self._one_run(x, y)
            with torch.no_grad():
                now_fooled = self.model(x_adv).argmax(1) != y
            take = ~fooled
            best[take] = x_adv[take]
            fooled |= now_fooled
        return best

    def _one_run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        state = self.prepare(x)
        x_adv = random_start(x, self.eps, self.generator)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            grad, = torch.autograd.grad(self.attack_loss(x_adv, y, state), x_adv)
            x_adv = project(x, x_adv.detach() + self.alpha * grad.sign(), self.eps)
        return x_adv


class DefenseAwarePGD(PGD):
    """PGD that also keeps the repair's loss low (Mao et al., ICCV 2021): maximize
    CE(F(x + δ), y) − λ · L_m(x + δ), where L_m is the multi-task SSL loss the repair minimizes. A large λ makes
    attacked images look clean to the SSL tasks, leaving the repair (and any loss-based gate) nothing to reverse.

    L_m's augmentation parameters are each image's own draws (runtime/draws.py), new ones every step.
    Shapes: x N×3×H×W in [0, 1], y N -> N×3×H×W.

    Example::

        x_adv = DefenseAwarePGD(classifier, pipeline.objective, lam=10.0)(x, y)
    """

    def __init__(self, model: nn.Module, objective: nn.Module, lam: float = 1.0, eps: float = 8 / 255,
                 alpha: float = 2 / 255, steps: int = 20, seed: int = 0) -> None:
        super().__init__(model, eps, alpha, steps, generator=torch.Generator().manual_seed(seed))
        self.objective, self.lam, self.seed = objective, lam, seed

    def prepare(self, x: torch.Tensor) -> Iterator[Params]:
        params = self.objective.draw(x, self.seed, self.steps)
        return (at_step(params, step) for step in range(self.steps))

    def attack_loss(self, x_adv: torch.Tensor, y: torch.Tensor, steps: Iterator[Params]) -> torch.Tensor:
        ssl = self.objective(x_adv, next(steps))
        return F.cross_entropy(self.model(x_adv), y, reduction="sum") - self.lam * ssl.sum()


class BPDAEOT(nn.Module):
    """PGD through the repair with BPDA + EOT (Athalye et al., ICML 2018; Croce et al., ICML 2022).

    Each step runs the randomized repair on x + δ ``eot`` times with fresh seeds and averages the gradients of
    CE(F(repair(x + δ)), y) taken w.r.t. the repaired images: the repair is the identity in the backward pass (BPDA),
    so its own optimization is never differentiated. ``repair`` is any callable (images, seed) -> repaired images,
    e.g. ``lambda x, s: pipeline.repair(x, steps=10, seed=s)``.

    Shapes: x N×3×H×W in [0, 1], y N -> N×3×H×W.
    """

    def __init__(self, model: nn.Module, repair: Callable[[torch.Tensor, int], torch.Tensor], eps: float = 8 / 255,
                 alpha: float = 2 / 255, steps: int = 10, eot: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.model, self.repair, self.eps, self.alpha = model, repair, eps, alpha
        self.steps, self.eot, self.seed = steps, eot, seed

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = random_start(x, self.eps, torch.Generator().manual_seed(self.seed))
        for step in range(self.steps):
            grad = torch.zeros_like(x)
            for sample in range(self.eot):
                with torch.enable_grad():
                    repaired = self.repair(x_adv, 1_000_003 * self.seed + step * self.eot + sample)
                repaired = repaired.detach().requires_grad_(True)
                loss = F.cross_entropy(self.model(repaired), y, reduction="sum")
                grad += torch.autograd.grad(loss, repaired)[0]
            x_adv = project(x, x_adv + self.alpha * grad.sign(), self.eps)
        return x_adv


def pyautoattack():
    """AutoAttack's package (an optional extra), or ImportError saying how to install it."""
    try:
        import pyautoattack
        import pyautoattack.autopgd_base
        import pyautoattack.square
    except ImportError:
        raise ImportError("AutoAttack's attacks need the pyautoattack package: pip install -e \".[attacks]\"") from None
    return pyautoattack


class AutoAttackAPGD(nn.Module):
    """AutoAttack's attacks (Croce & Hein, ICML 2020) from fra31's implementation, through its maintained package
    ``pyautoattack`` (an optional extra: ``pip install -e ".[attacks]"``) — not a rewrite. By default its two
    gradient attacks, APGD-CE and APGD-T; ``attacks`` may name any of the package's (``apgd-dlr``, ``fab-t``,
    ``square``, …): the standard version is ``("apgd-ce", "apgd-t", "fab-t", "square")``. As in the package, each
    attack only runs on the images the ones before it left classified correctly.

    ``iters`` (APGD and FAB), ``targets`` (target classes of APGD-T and FAB-T), ``square_queries`` and ``eot``
    (gradient samples per APGD step, for a randomized model) default to the standard version's 100, 9, 5000 and 1;
    fewer make it cheaper and weaker, say so where used. Shapes: x N×3×H×W in [0, 1], y N -> N×3×H×W.

    Example::

        x_adv = AutoAttackAPGD(model, eps=8/255)(x, y)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, attacks: tuple[str, ...] = ("apgd-ce", "apgd-t"),
                 iters: int = 100, targets: int = 9, eot: int = 1, seed: int = 0,
                 square_queries: int = 5000) -> None:
        super().__init__()
        self.model, self.eps, self.attacks = model, eps, attacks
        self.iters, self.targets, self.eot, self.seed, self.square_queries = iters, targets, eot, seed, square_queries

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        autoattack = pyautoattack()
        AutoAttack, APGDAttack = autoattack.AutoAttack, autoattack.autopgd_base.APGDAttack
        APGDAttack_targeted = autoattack.autopgd_base.APGDAttack_targeted
        aa = AutoAttack(self.model, attacks=list(self.attacks), version="custom", eps=self.eps, seed=self.seed,
                        device=x.device)
        # APGD derives its step-size schedule from n_iter when built: rebuild both rather than edit n_iter
        common = dict(n_iter=self.iters, eps=self.eps, seed=self.seed, eot_iter=self.eot, rho=0.75,
                      device=x.device, logger=aa.logger)
        aa.apgd = APGDAttack(self.model, n_restarts=1, **common)
        aa.apgd_targeted = APGDAttack_targeted(self.model, n_restarts=1, n_target_classes=self.targets, **common)
        aa.fab.n_restarts, aa.fab.n_iter, aa.fab.n_target_classes = 1, self.iters, self.targets
        aa.square.n_queries = self.square_queries
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv.detach()


class APGDEveryImage(nn.Module):
    """APGD (Croce & Hein, ICML 2020; ``pyautoattack``'s implementation) on every image, returning the point of highest
    loss found (the package's ``best_loss``): against a randomized defense, an image one draw happened to misclassify
    is still attacked, where AutoAttack's own runner would hand it back clean. ``loss``: "ce" or "dlr"; ``eot``
    gradient samples per step. Shapes: x N×3×H×W in [0, 1], y N -> N×3×H×W.

    Example::

        x_adv = APGDEveryImage(DefendedClassifier(pipeline, bpda=True), eps=8/255, loss="dlr", eot=4)(x, y)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, loss: str = "ce", iters: int = 100, eot: int = 1,
                 seed: int = 0) -> None:
        super().__init__()
        self.model, self.eps, self.loss, self.iters, self.eot, self.seed = model, eps, loss, iters, eot, seed

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        apgd = pyautoattack().autopgd_base.APGDAttack(self.model, n_iter=self.iters, eps=self.eps, seed=self.seed,
                                                      loss=self.loss, eot_iter=self.eot, rho=0.75, n_restarts=1,
                                                      device=x.device)
        # the package seeds torch only when best_loss is False: its random start would come from the process's
        # global generator (the same points for every seed, others after any other draw), so it is seeded here
        with seeded(self.seed, x.device):
            return apgd.perturb(x, y, best_loss=True).detach()


class SquareEveryImage(nn.Module):
    """Square (Andriushchenko et al., ECCV 2020; ``pyautoattack``'s implementation), a score-based black-box attack,
    on every image, returning each image's last accepted candidate. Against a randomized defense AutoAttack's own
    runner hands back the *clean* image wherever one draw of the model erred (before the attack or at its final
    check), so that a later scoring of that clean image may find it robust; here an image that a draw misclassifies
    keeps the candidate that fooled it (at least Square's initial stripes), and every other keeps its best one.
    ``queries``: model calls per image. Shapes: x N×3×H×W in [0, 1], y N -> N×3×H×W.

    Example::

        x_adv = SquareEveryImage(DefendedClassifier(pipeline, bpda=False), eps=8/255, queries=1000)(x, y)
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, queries: int = 5000, seed: int = 0) -> None:
        super().__init__()
        self.model, self.eps, self.queries, self.seed = model, eps, queries, seed

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        square = pyautoattack().square.SquareAttack(self.model, norm="Linf", eps=self.eps, n_queries=self.queries,
                                                    p_init=0.8, seed=self.seed, device=x.device)
        square.init_hyperparam(x)
        with seeded(self.seed, x.device):         # Square draws its squares from torch's global generator
            _, x_adv = square.attack_single_run(x, y.long().to(x.device))
        return x_adv.detach()


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global generator (and the device's) seeded with ``seed`` inside, left as it was outside: for the
    attacks of ``pyautoattack`` that draw from it, so that a seed gives the same points in a fresh, a resumed or a
    split run."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.random.manual_seed(seed)
        yield


class KeptByDeployed(nn.Module):
    """``model`` (what an attack differentiates: a BPDA surrogate, fresh draws, the classifier alone) with every
    point the attack asks it about judged on ``deployed`` as well: x -> logits of the function a user deploys (the
    repair at its fixed seed, all steps, then the classifier). ``kept`` holds per image the first point ``deployed``
    misclassified, else the one of its smallest margin (true logit minus the largest other).

    An attack chooses its final point by what it runs (APGD: its highest loss on the surrogate's draws); an attacker
    of the deployed service gets that function's exact answer to every query, and keeps what it says — so the point
    kept here is the attack's, judged as that attacker would. The attack must call the model on the whole batch.

    Shapes: x N×3×H×W in [0, 1], y N.

    Example::

        judged = KeptByDeployed(DefendedClassifier(pipeline, bpda=True), deployed, x, y)
        APGDEveryImage(judged, eps=8/255)(x, y)
        x_adv = judged.kept
    """

    def __init__(self, model: nn.Module, deployed: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor) -> None:
        super().__init__()
        self.model, self.deployed, self.y = model, deployed, y
        self.kept = x.detach().clone()
        self.margin = torch.full((len(x),), float("inf"), device=x.device)
        self.broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.last: torch.Tensor | None = None
        self.judged = 0                          # distinct points judged (APGD asks EOT times about each iterate)

    def judge(self, x_adv: torch.Tensor) -> None:
        x_adv = x_adv.detach()
        if self.last is not None and torch.equal(x_adv, self.last):
            return
        if x_adv.shape != self.kept.shape:
            raise ValueError(f"an attack asked about {tuple(x_adv.shape)} of a batch of {tuple(self.kept.shape)}: "
                             "the deployed function judges whole batches only")
        self.last, self.judged = x_adv.clone(), self.judged + 1
        with torch.no_grad():
            logits = self.deployed(x_adv)
        true = logits.gather(1, self.y[:, None]).squeeze(1)
        other = logits.scatter(1, self.y[:, None], float("-inf")).amax(1)
        margin, wrong = true - other, logits.argmax(1) != self.y
        take = ~self.broken & (wrong | (margin < self.margin))
        self.kept[take], self.margin[take] = x_adv[take], margin[take]
        self.broken |= wrong

    def forward(self, x_adv: torch.Tensor) -> torch.Tensor:
        self.judge(x_adv)
        return self.model(x_adv)
