"""What every fastft command shares: a parser for CONFIG [key.sub=value ...], and one way to end on a mistake
(one line on stderr naming the command, exit status 2, the process group left cleanly)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .checkpoint import CheckpointError
from .config import ConfigError
from .distributed import cleanup
from .pipelines.bad_images import BadImageError

# Mistakes in what the user asked for (or in the data it points to): reported in one line, never as a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, FileNotFoundError, BadImageError)


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def config_parser(prog: str, doc: str | None,
                  config_help: str = "a YAML file or a packaged config name (demo, in1k, ...)",
                  overrides_help: str = "key.sub=value overrides, e.g. optim.epochs=10") -> argparse.ArgumentParser:
    ap = parser(prog, doc)
    ap.add_argument("config", help=config_help)
    ap.add_argument("overrides", nargs="*", help=overrides_help)
    return ap


def encoder_parser(prog: str, doc: str | None, overrides_help: str) -> tuple[argparse.ArgumentParser, object]:
    """The evaluation commands' parser: CONFIG, overrides, and which encoder (--pretrained CKPT | --random-init;
    default: the newest checkpoint in run.out_dir). Returns the parser and that exclusive group (for more)."""
    ap = config_parser(prog, doc, "the config the encoder was pretrained with: a YAML file or a packaged name "
                                  "(demo, in1k, ...)", overrides_help)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--pretrained", metavar="CKPT", help="pretraining checkpoint (default: newest in run.out_dir)")
    which.add_argument("--random-init", action="store_true", help="the same architecture at random initialisation")
    return ap, which


def run(prog: str, body: Callable[[], int | None], errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """body()'s exit status (None = 0); `errors` become one line and status 2."""
    try:
        return body() or 0
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
