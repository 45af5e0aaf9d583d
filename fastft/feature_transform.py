"""Feature Transformation (Zhu et al., ICCV 2021), exactly as the authors' code does it: the whole method.

Positive extrapolation (harder positives), lam_p = 1 + Beta(a_p, a_p) in [1, 2]:
    q_hat = lam_p * q + (1 - lam_p) * k
    k_hat = lam_p * k + (1 - lam_p) * q        # the ORIGINAL q: gradient reaches q through k_hat too
Negative interpolation (more diverse negatives), lam_n = Beta(a_n, a_n) in [0, 1], perm = randperm(K):
    neg = lam_n * queue + (1 - lam_n) * queue[perm]   # for this step's logits only; the queue is untouched

By default one scalar lambda each per step per process, no re-normalisation after mixing (docs/design.md,
section 1). The negative mix is described by a `NegativeMix` (lam_n, perm) that every loss implementation
consumes: the torch loss forms it with `NegativeMix.apply`, the Triton kernel forms the same mix in registers
(kernels/infonce_triton.py) and is checked against `apply` (tests/test_loss.py).

Scalar lambdas and the permutation come from this object's own generators, seeded from (seed, stream): with
stream = rank every process draws its own (the authors' behaviour), with one stream for all ranks
(`ft.share_lambdas`) every rank draws the same without communicating. Their state is checkpointed, so a
resumed run draws what the uninterrupted one would have. Per-element masks use torch's global RNG.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import torch
import torch.nn.functional as F

from .config import FTConfig

Lambda = float | torch.Tensor  # a scalar per step, or a per-element mask ([N, C] positives, [K, C] negatives)


@dataclass(frozen=True)
class NegativeMix:
    """This step's negative interpolation: neg = lam * queue + (1 - lam) * queue[perm]."""
    lam: Lambda
    perm: torch.Tensor  # [K] permutation of the queue rows

    @property
    def scalar(self) -> bool:
        """One lambda for every element (the authors' default), as the fused kernel takes it."""
        return not (isinstance(self.lam, torch.Tensor) and self.lam.dim() > 0)

    def apply(self, queue: torch.Tensor) -> torch.Tensor:
        """The mixed negatives: a fresh [K, C] tensor in the queue's dtype; `queue` is read, never written."""
        return self.lam * queue + (1 - self.lam) * queue[self.perm]


@dataclass
class FTDraw:
    """This step's random draws; None where that half of FT is off."""
    lam_p: Lambda | None = None
    mix: NegativeMix | None = None

    @property
    def transformed(self) -> bool:
        return self.lam_p is not None or self.mix is not None


def sample_lambda(dist: str, alpha: float, shape: tuple[int, ...], device: torch.device,
                  rng: np.random.Generator | None = None) -> Lambda:
    """Beta(alpha, alpha) or U(0, 1): a float drawn from `rng` when `shape` is (), else a tensor on `device`."""
    if not shape:
        rng = rng if rng is not None else np.random.default_rng()
        return float(rng.beta(alpha, alpha) if dist == "beta" else rng.random())
    if dist == "beta":
        a = torch.tensor(float(alpha), device=device)
        return torch.distributions.Beta(a, a).sample(shape)
    return torch.rand(shape, device=device)


def transform_positives(q: torch.Tensor, k: torch.Tensor, lam_p: Lambda,
                        renorm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    q_hat = lam_p * q + (1 - lam_p) * k
    k_hat = lam_p * k + (1 - lam_p) * q
    if renorm:
        q_hat, k_hat = F.normalize(q_hat, dim=1), F.normalize(k_hat, dim=1)
    return q_hat, k_hat


class FeatureTransform:
    def __init__(self, cfg: FTConfig, seed: int = 0, stream: int = 0):
        self.cfg = cfg
        self.seed, self.stream = seed, stream
        self.rng = np.random.default_rng([seed, stream])
        self._perm_gen: torch.Generator | None = None
        self._perm_state: torch.Tensor | None = None  # restored before the generator's device is known

    def perm_generator(self, device: torch.device) -> torch.Generator:
        if self._perm_gen is None or self._perm_gen.device != device:
            self._perm_gen = torch.Generator(device=device)
            self._perm_gen.manual_seed(int(np.random.default_rng([self.seed, self.stream, 1]).integers(2 ** 62)))
            if self._perm_state is not None:
                self._perm_gen.set_state(self._perm_state)
                self._perm_state = None
        return self._perm_gen

    def state(self) -> dict:
        perm = self._perm_gen.get_state() if self._perm_gen is not None else self._perm_state
        return {"rng": self.rng.bit_generator.state, "perm": perm}

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._perm_gen, self._perm_state = None, state["perm"]

    def enabled(self, epoch: int) -> bool:
        return (self.cfg.pos != "none" or self.cfg.neg != "none") and epoch >= self.cfg.start_epoch

    def draw(self, n: int, queue: torch.Tensor, epoch: int) -> FTDraw:
        """Lambdas and permutation for one step (nothing drawn before `start_epoch` or when FT is off)."""
        out = FTDraw()
        if not self.enabled(epoch):
            return out
        c, kq = queue.shape[1], queue.shape[0]
        per_element = {"pos": ("pos", "both"), "neg": ("neg", "both")}
        if self.cfg.pos != "none":
            shape = (n, c) if self.cfg.dim_mask in per_element["pos"] else ()
            lam = sample_lambda(self.cfg.dist, self.cfg.alpha_pos, shape, queue.device, self.rng)
            out.lam_p = 1 + lam if self.cfg.pos == "extrapolate" else lam
        if self.cfg.neg != "none":
            shape = (kq, c) if self.cfg.dim_mask in per_element["neg"] else ()
            lam_n = sample_lambda(self.cfg.dist, self.cfg.alpha_neg, shape, queue.device, self.rng)
            perm = torch.randperm(kq, device=queue.device, generator=self.perm_generator(queue.device))
            out.mix = NegativeMix(lam_n, perm)
        return out

    def positives(self, q: torch.Tensor, k: torch.Tensor, draw: FTDraw) -> tuple[torch.Tensor, torch.Tensor]:
        if draw.lam_p is None:
            return q, k
        return transform_positives(q, k, draw.lam_p, self.cfg.postmix_norm)
