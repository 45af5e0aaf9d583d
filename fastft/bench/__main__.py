"""`python -m fastft.bench MODE ...`: the fastft-bench command (fastft/bench/cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
