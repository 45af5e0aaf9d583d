"""Pretrain an encoder with MoCo + Feature Transformation: `fastft-train CONFIG [key.sub=value ...]`.

CONFIG is a YAML file or the name of a packaged config (`fastft-train --list-configs`): `demo` trains on
built-in data on the CPU in minutes, `in1k` / `in100` are the authors' ImageNet recipes. Run it under
`torchrun --nproc_per_node=N -m fastft.train ...` for several GPUs or nodes. Running the same command again
resumes the run from its newest checkpoint.
"""
from __future__ import annotations

import sys

from . import cli
from .config import describe_config, find_config, load_config, packaged_configs
from .trainer import train


def config_listing() -> str:
    """Each packaged config's name, with the first line of its header comment."""
    rows = []
    for name, path in packaged_configs().items():
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        about = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        rows.append(f"{name:<26} {about}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("fastft-train", __doc__)
    # CONFIG is optional for --list-configs only (checked below)
    ap.add_argument("config", nargs="?", metavar="CONFIG",
                    help="a YAML file, or the name of a packaged config (demo, in1k, in100, ablations/neg, ...)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.epochs=10 run.out_dir=runs/x")
    ap.add_argument("--list-configs", action="store_true", help="list the packaged configs and exit")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config (every key with its type, valid range and default) and exit")
    args = ap.parse_intermixed_args(argv)
    if args.list_configs:
        print(config_listing())
        return 0
    if args.config is None:
        ap.error("the following arguments are required: CONFIG (a YAML file or a packaged config: --list-configs)")

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(f"# {find_config(args.config)} with {' '.join(args.overrides) or 'no overrides'}")
            print(describe_config(cfg))
            return
        train(cfg)

    return cli.run("fastft-train", body)


if __name__ == "__main__":
    sys.exit(main())
