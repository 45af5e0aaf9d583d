"""Pretraining: `fastft-train CONFIG [key.sub=value ...]` (or `python -m fastft.train`, also under torchrun).

The training loop itself is fastft/trainer.py; this is only its command line.
"""
from __future__ import annotations

import sys

from . import cli
from .config import load_config
from .trainer import train


def main(argv: list[str] | None = None) -> int:
    args = cli.config_parser("fastft-train", __doc__,
                             overrides_help="key.sub=value overrides, e.g. optim.epochs=10 run.out_dir=runs/x"
                             ).parse_args(argv)

    def body() -> None:
        train(load_config(args.config, args.overrides))

    return cli.run("fastft-train", body)


if __name__ == "__main__":
    sys.exit(main())
