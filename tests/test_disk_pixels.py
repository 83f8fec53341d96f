"""Folders whose decoded pixels exceed KEEP_PIXELS_BYTES: the folder check keeps them in an
unnamed temporary file (data.disk_store) and training reads them instead of decoding again;
where the disk has no room, one line says so and training decodes as before."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from edgetl import data
from edgetl.backbones import get_backbone, preprocessing

SIZE = (24, 24)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("disk_pixels") / "data"
    data.make_synth(out, classes=3, per_class=30, size=28, seed=4)
    return out


def _mapped_from(folder: Path) -> list[str]:
    """Lines of /proc/self/maps of files in ``folder`` (an unnamed file shows as deleted)."""
    with open("/proc/self/maps") as f:
        return [line for line in f if f" {folder}/" in line]


def _no_decoding(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("an image was decoded again")

    monkeypatch.setattr(data, "load_pixels", refuse)


def test_pixels_over_the_memory_bound_are_kept_in_an_unnamed_file_and_give_the_same_batches(
        root, tmp_path, monkeypatch):
    in_memory = data.scan_folder(root, SIZE, keep_pixels=True)
    monkeypatch.setattr(data, "KEEP_PIXELS_BYTES", 1000)
    run = tmp_path / "run"
    run.mkdir()
    on_disk = data.scan_folder(root, SIZE, keep_pixels=True, spill_dir=run)
    assert on_disk.pixels_note.startswith(f"decoded images kept in a temporary file in '{run}'")
    assert list(run.iterdir()) == []  # no name: nothing to clean up after a crash
    assert _mapped_from(run), "the pixels are not in a file in the run folder"
    assert set(on_disk.pixels) == set(in_memory.pixels)
    for p, img in in_memory.pixels.items():
        np.testing.assert_array_equal(on_disk.pixels[p], img)

    prep = preprocessing(get_backbone("mobilenetv2"))
    items = list(on_disk.items)
    for training, augment in ((True, True), (False, False)):
        monkeypatch.setattr(data, "KEEP_PIXELS_BYTES", 1 << 30)
        from_memory = data.make_dataset(items, SIZE, prep, 16, training, augment, 3,
                                        pixels=in_memory.pixels)
        monkeypatch.setattr(data, "KEEP_PIXELS_BYTES", 1000)
        with monkeypatch.context() as m:
            _no_decoding(m)
            from_disk = data.make_dataset(items, SIZE, prep, 16, training, augment, 3,
                                          pixels=on_disk.pixels)
            for _ in range(2):
                pairs = list(zip(from_disk, from_memory))
                assert len(pairs) == -(-len(items) // 16)
                for (xa, ya), (xb, yb) in pairs:
                    np.testing.assert_array_equal(ya.numpy(), yb.numpy())
                    np.testing.assert_allclose(xa.numpy(), xb.numpy(), atol=1e-5)


def test_without_a_place_on_disk_nothing_over_the_bound_is_kept(root, monkeypatch):
    monkeypatch.setattr(data, "KEEP_PIXELS_BYTES", 1000)
    folder = data.scan_folder(root, SIZE, keep_pixels=True)
    assert folder.pixels is None and folder.pixels_note is None


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (root only): a disk with little room."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield where
    gc.collect()
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_disk_without_room_says_so_and_the_images_are_decoded(root, small_disk,
                                                                 monkeypatch):
    monkeypatch.setattr(data, "KEEP_PIXELS_BYTES", 1000)
    need = 90 * 48 * 48 * 3  # 622 KB of a 1 MiB disk: over half its free space
    folder = data.scan_folder(root, (48, 48), keep_pixels=True, spill_dir=small_disk)
    assert folder.pixels is None
    assert folder.pixels_note == (
        f"note: the decoded images ({need / 1e6:.0f} MB) would take over half the free space "
        f"of '{small_disk}' (1 MB free): every epoch decodes the images again")
    assert list(small_disk.iterdir()) == []

    # Room when checked, none when reserved (something else filled the disk meanwhile):
    # the reservation fails cleanly instead of a crash when a page cannot be written.
    real = shutil.disk_usage
    monkeypatch.setattr(data.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1 << 40))
    folder = data.scan_folder(root, (80, 80), keep_pixels=True, spill_dir=small_disk)
    assert folder.pixels is None
    assert folder.pixels_note.startswith(f"note: cannot keep the decoded images in "
                                         f"'{small_disk}' (No space left on device)")
    assert list(small_disk.iterdir()) == [] and _mapped_from(small_disk) == []
    prep = preprocessing(get_backbone("mobilenetv2"))
    x, _ = next(iter(data.make_dataset(list(folder.items), (80, 80), prep, 4, False, False, 0,
                                       pixels=folder.pixels)))
    assert x.shape == (4, 80, 80, 3)


def test_train_over_the_bound_reads_the_kept_pixels_and_says_where_they_are(
        root, tmp_path, monkeypatch, capsys):
    from edgetl.train import train

    monkeypatch.setattr(data, "KEEP_PIXELS_BYTES", 1000)
    out = tmp_path / "run"
    decoded = []
    real = data.load_pixels
    monkeypatch.setattr(data, "load_pixels", lambda *a, **k: decoded.append(a) or real(*a, **k))
    train(tiny_config(root, out, epochs=1, quiet=False))
    err = capsys.readouterr().err
    assert f"decoded images kept in a temporary file in '{out}'" in err
    assert decoded == []  # no epoch decoded an image: the folder check's pixels were read
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "model.keras").exists() or any(out.glob("*.keras"))


def test_greyscale_models_keep_greyscale_pixels_and_read_them(root, monkeypatch):
    folder = data.scan_folder(root, SIZE, keep_pixels=True, channels=1)
    path = folder.items[5][0]
    assert folder.pixels[path].shape == (*SIZE, 1)
    np.testing.assert_array_equal(folder.pixels[path], data.load_pixels(path, SIZE, 1))
    prep = {"mean": [127.5], "std": [127.5], "channel_order": "RGB"}
    items = list(folder.items)
    decoded = data.make_dataset(items, SIZE, prep, 16, True, True, 1, channels=1)
    expected = [(x.numpy(), y.numpy()) for x, y in decoded]
    with monkeypatch.context() as m:
        _no_decoding(m)
        kept = data.make_dataset(items, SIZE, prep, 16, True, True, 1, pixels=folder.pixels,
                                 channels=1)
        got = [(x.numpy(), y.numpy()) for x, y in kept]
    assert len(got) == len(expected)
    for (xa, ya), (xb, yb) in zip(got, expected):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_allclose(xa, xb, atol=1e-5)


def test_over_the_bound_and_not_kept_every_epoch_decodes_and_memory_stays_bounded(
        root, monkeypatch):
    folder = data.scan_folder(root, SIZE)
    items = list(folder.items)
    calls = []
    real = data.load_pixels
    monkeypatch.setattr(data, "load_pixels", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    prep = preprocessing(get_backbone("mobilenetv2"))
    monkeypatch.setattr(data, "KEEP_PIXELS_BYTES", 1000)
    ds = data.make_dataset(items, SIZE, prep, 16, True, False, 0)
    epochs = [np.concatenate([y.numpy() for _, y in ds]) for _ in range(2)]
    assert sorted(calls) == sorted(2 * [p for p, _ in items])  # nothing kept between epochs
    assert sorted(epochs[0]) == sorted(epochs[1]) and list(epochs[0]) != list(epochs[1])


def test_where_the_file_system_cannot_fallocate_the_space_is_written(tmp_path, monkeypatch):
    """macOS has no posix_fallocate: the zeros are written instead, and a full disk still
    fails at reservation (small_disk covers the real ENOSPC)."""
    monkeypatch.delattr(data.os, "posix_fallocate")
    array, note = data.disk_store(tmp_path, (5, 1000, 1000, 3))
    assert array.shape == (5, 1000, 1000, 3) and note.startswith("decoded images kept")
    array[4, 999, 999] = 7
    assert int(array[4, 999, 999, 0]) == 7 and int(array[0, 0, 0, 0]) == 0
