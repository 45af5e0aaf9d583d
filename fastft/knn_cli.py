"""`fastft-knn CONFIG [--pretrained CKPT | --random-init | --pixels] [key.sub=value ...]`: the weighted kNN
monitor on its own, for a pretraining checkpoint (default: the newest in run.out_dir), the same
architecture at random initialisation, or the pixels themselves (after the eval transform).
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import cli
from .config import load_config
from .device import pick_device, pick_precision, set_threads
from .knn import PIXELS, knn_features
from .pretrained import pick_backbone


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap, which = cli.encoder_parser("fastft-knn", __doc__, "key.sub=value overrides, e.g. knn.k=20")
    which.add_argument("--pixels", action="store_true",
                       help="no encoder: the pixels as the eval transform gives them (resized, centre-cropped, "
                            "ImageNet-normalised)")
    return ap.parse_intermixed_args(argv)  # options may come before, between or after the overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        device = pick_device(cfg.run.device)
        dtype = pick_precision(cfg.run.precision, device)
        set_threads(cfg.run.threads)
        if args.pixels:
            encode, what = (lambda x: x), PIXELS
        else:
            backbone = pick_backbone(cfg, args.pretrained, args.random_init)
            encode = backbone.module.to(device).eval()
            if cfg.run.channels_last:
                encode = encode.to(memory_format=torch.channels_last)
            what = backbone.info.describe()
        res = knn_features(encode, cfg, device, dtype)
        print(f"kNN top-1 on {cfg.data.val_split} (k {cfg.knn.k}, T {cfg.knn.temperature}; {res.n_train} train / "
              f"{res.n_val} val images): {res.top1:.4f}  [{what}]"
              + (f"; {res.bad_images} unreadable image(s) replaced" if res.bad_images else ""))

    return cli.run("fastft-knn", body)


if __name__ == "__main__":
    sys.exit(main())
