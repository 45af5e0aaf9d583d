"""Contrastive logits/loss kernels. `reference` is pure torch and is the spec every fast kernel is checked against."""
from .reference import info_nce_loss, mix_negatives, moco_logits

__all__ = ["info_nce_loss", "mix_negatives", "moco_logits"]
