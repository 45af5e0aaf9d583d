"""The ImageFolder side shared by the backends: dataset roots, class subsets (images that fail to decode:
bad_images.py)."""
from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from .bad_images import load_rgb
from .builtin import is_builtin, materialize
from .spec import spec_error


def dataset_root(path: str, cache_dir: str) -> Path:
    """The folder holding the split sub-folders: a user's tree, or a materialised built-in dataset."""
    if is_builtin(path):
        return materialize(path, cache_dir)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise spec_error(FileNotFoundError, "path", f" {path!r}: no such folder (expected an ImageFolder root "
                                                    f"holding train/ and val/, or builtin:digits)")
    return root


def read_class_list(path: str | Path) -> list[str]:
    """Class folder names, one a line (# comments); an empty or non-UTF-8 file is a ValueError naming it."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise spec_error(ValueError, "class_list", f" {str(path)!r}: not UTF-8 text ({e.reason} at byte "
                                                   f"{e.start}); save it as UTF-8") from None
    classes = [ln for ln in lines if ln and not ln.startswith("#")]
    if not classes:
        raise spec_error(ValueError, "class_list", f" {str(path)!r}: lists no class (one folder name a line)")
    return classes


class SubsetImageFolder(ImageFolder):
    """ImageFolder restricted to `classes` (e.g. the ImageNet-100 list); labels in sorted-name order."""

    def __init__(self, root: str | Path, classes: list[str] | None = None, class_list_name: str = "", **kw):
        self._keep = sorted(classes) if classes else None
        self._class_list_name = class_list_name
        super().__init__(str(root), loader=load_rgb, **kw)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"no such folder: {directory}")
        if self._keep is None:
            classes, _ = super().find_classes(directory)
        else:
            missing = [c for c in self._keep if not (Path(directory) / c).is_dir()]
            if missing:
                shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                raise FileNotFoundError(f"{directory}: classes from {self._class_list_name or 'the class list'} "
                                        f"have no folder: {shown}")
            classes = self._keep
        return classes, {c: i for i, c in enumerate(classes)}
