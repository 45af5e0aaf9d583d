"""Check which way imports run (the contracts in .importlinter) with import-linter: `python scripts/lint_imports.py`.

pipelines/ and kernels/ install as fastft.pipelines and fastft.kernels (pyproject.toml `package-dir`), and
import-linter reads packages from disk: the checkout holds fastft/kernels and fastft/pipelines as symlinks to
them, so a plain `lint-imports` sees the installed layout. This script checks a copy of the source laid out as
installed (no symlinks), in a Python started with -S (the editable install's import hook would otherwise point
`fastft` back at the source folder): what `make test` runs before pytest, and what the tests call.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUT = {"fastft": "fastft", "pipelines": "fastft/pipelines", "kernels": "fastft/kernels"}


def installed_layout(dest: Path, repo: Path = REPO) -> Path:
    """A copy of the three source folders under `dest`, nested as they install; returns `dest`."""
    for src, to in LAYOUT.items():
        # fastft/kernels and fastft/pipelines in the checkout are symlinks to the real folders: copied once, here.
        shutil.copytree(repo / src, dest / to, ignore=shutil.ignore_patterns("__pycache__", *(
            [] if src != "fastft" else ["kernels", "pipelines"])))
    return dest


def lint(tree: Path, config: Path = REPO / ".importlinter") -> subprocess.CompletedProcess:
    """lint-imports over the package in `tree` (its exit status: 0 when every contract is kept)."""
    site = sysconfig.get_paths()["purelib"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), site]))
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-S", "-c", code, str(config), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fastft-imports-") as tmp:
        out = lint(installed_layout(Path(tmp)))
    print(out.stdout + out.stderr, end="")
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
