"""The import rules of .importlinter hold for the tree, and a wrong-way import breaks the contract that names it."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lint_imports", REPO / "scripts" / "lint_imports.py")
lint_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lint_imports)


def test_the_tree_keeps_every_contract(tmp_path):
    out = lint_imports.lint(lint_imports.installed_layout(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout and "kept" in out.stdout


@pytest.mark.parametrize("module,line,contract", [
    ("fastft/pipelines/augment.py", "from fastft.config import Config", "pipelines are independent of the core"),
    ("fastft/kernels/reference.py", "import fastft.feature_transform", "kernels import only torch and triton"),
    ("fastft/moco.py", "from fastft.data import pretrain_loader", "the model, FT and the losses import no loader"),
    ("fastft/trainer.py", "import fastft.train", "nothing imports an entry point"),
    ("fastft/feature_transform.py", "import fastft.moco", "entry points -> trainer"),
])
def test_a_wrong_way_import_is_caught(tmp_path, module, line, contract):
    tree = lint_imports.installed_layout(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # the wrong way\n")
    out = lint_imports.lint(tree)
    assert out.returncode != 0
    broken = out.stdout.split("Broken contracts", 1)[-1]
    assert contract in " ".join(broken.split()), out.stdout


def test_every_module_is_named_in_the_contracts_that_list_modules():
    """The contracts list modules by name: a new module must be added there, or the rules would not see it."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".importlinter")
    listed = lambda contract, key: set(cfg[f"importlinter:contract:{contract}"][key].split())
    core = {f"fastft.{p.stem}" for p in (REPO / "fastft").glob("*.py") if p.stem != "__init__"}
    # fastft/kernels and fastft/pipelines are symlinks to the top-level folders, listed on their own
    core |= {f"fastft.{p.name}" for p in (REPO / "fastft").iterdir() if (p / "__init__.py").is_file()
             and not p.is_symlink()}
    pipelines = {f"fastft.pipelines.{p.stem}" for p in (REPO / "pipelines").glob("*.py") if p.stem != "__init__"}
    assert core - listed("kernels", "forbidden_modules") == set()
    assert core - listed("pipelines", "forbidden_modules") == set()
    entry = listed("entry-points", "forbidden_modules")
    assert (core | pipelines) - entry - listed("entry-points", "source_modules") == set()
    assert entry == listed("entry-points-alone", "modules")
