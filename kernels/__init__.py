"""Contrastive logits/loss kernels. `reference` is pure torch and is the spec every fast kernel is checked against."""
from .reference import NegStats, histogram_bins, info_nce_loss, mix_negatives, moco_logits, neg_score_stats

__all__ = ["NegStats", "histogram_bins", "info_nce_loss", "mix_negatives", "moco_logits", "neg_score_stats"]
