"""Contrastive loss kernels. `reference` is pure torch and is the spec every fast kernel is checked against.

The Triton kernels (`infonce_triton`: `info_nce_loss_triton`, `neg_logsumexp`, `NegLogSumExp`) are exported
lazily: importing this package does not import triton. That matters because whether the kernels are compiled
(CUDA) or interpreted (CPU) is fixed when `infonce_triton` is first imported (TRITON_INTERPRET=1 must be set
by then), and because the reference must work where triton is missing.

This package imports only torch and triton (checked by import-linter in `make test`).
"""
from .reference import NegStats, histogram, histogram_bins, info_nce_loss, moco_logits, neg_score_stats

_TRITON_API = ("info_nce_loss_triton", "neg_logsumexp", "NegLogSumExp")

__all__ = ["NegStats", "histogram", "histogram_bins", "info_nce_loss", "moco_logits", "neg_score_stats",
           *_TRITON_API]


def __getattr__(name: str):
    if name in _TRITON_API:
        from . import infonce_triton

        return getattr(infonce_triton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
