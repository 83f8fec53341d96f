"""make_dataset's in-process decode hands out its first batches before every image is decoded,
decodes each image once when it keeps them, and gives the batches of the kept pixels."""

from __future__ import annotations

import numpy as np
import pytest

from edgetl import data
from edgetl.backbones import get_backbone, preprocessing

SIZE = (24, 24)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode_order")
    data.make_synth(root, classes=3, per_class=40, size=28, seed=5)
    return data.scan_folder(root, SIZE, keep_pixels=True)


@pytest.fixture
def decoded(monkeypatch):
    """The paths load_pixels decoded (the real decoder still runs)."""
    calls = []
    real = data.load_pixels

    def counting(path, size, channels=3):
        calls.append(str(path))
        return real(path, size, channels)

    monkeypatch.setattr(data, "load_pixels", counting)
    return calls


def test_first_batch_comes_before_the_whole_folder_is_decoded(folder, decoded):
    items = list(folder.items)
    prep = preprocessing(get_backbone("mobilenetv2"))
    ds = data.make_dataset(items, SIZE, prep, 4, True, True, 0)
    it = iter(ds)
    next(it)
    # 120 images in 30 batches: the first batch waits for its own 4 images (and what
    # tf.data prefetches), not for all of them as a shuffle of decoded images did.
    assert 4 <= len(decoded) < len(items) // 2
    del it


def test_kept_images_are_decoded_once_and_batches_match_the_scans_pixels(folder, decoded):
    items = list(folder.items)
    prep = preprocessing(get_backbone("mobilenetv2"))
    for training, augment in ((True, True), (True, False), (False, False)):
        decoded.clear()
        ds = data.make_dataset(items, SIZE, prep, 16, training, augment, 7)
        kept = data.make_dataset(items, SIZE, prep, 16, training, augment, 7,
                                 pixels=folder.pixels)
        for _ in range(3):
            pairs = list(zip(ds, kept))
            assert len(pairs) == -(-len(items) // 16)
            for (xa, ya), (xb, yb) in pairs:
                np.testing.assert_array_equal(ya.numpy(), yb.numpy())
                np.testing.assert_allclose(xa.numpy(), xb.numpy(), atol=1e-5)
        assert sorted(decoded) == sorted(p for p, _ in items)  # once each over 3 epochs


def test_without_keeping_every_pass_decodes_again(folder, decoded):
    items = list(folder.items)[:20]
    prep = preprocessing(get_backbone("mobilenetv2"))
    ds = data.make_dataset(items, SIZE, prep, 8, False, False, 0, cache=False)
    first = np.concatenate([x.numpy() for x, _ in ds])
    second = np.concatenate([x.numpy() for x, _ in ds])
    np.testing.assert_array_equal(first, second)
    assert len(decoded) == 2 * len(items)
