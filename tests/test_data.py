"""edgetl.data: class folders, odd and broken images, splits, weights, samples, built-in datasets."""

from __future__ import annotations

import csv
import gzip
import io
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from conftest import realdata, tiny_config
from edgetl.data import (FASHION_MNIST, balanced_sample, class_weights, idx_to_folders,
                         make_synth, read_idx, scan_folder, stratified_split)
from edgetl.errors import EdgetlError
from edgetl.runner import load_image

# --- scan_folder --------------------------------------------------------------------------------


def _rgb(seed: int, size=(20, 16)) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _jpeg_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb(seed, (64, 64))).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def odd_formats(tmp_path) -> Path:
    """Class 'odd': one image per awkward mode/format; class 'plain': two ordinary JPEGs."""
    root = tmp_path / "data"
    odd, plain = root / "odd", root / "plain"
    odd.mkdir(parents=True)
    plain.mkdir()
    Image.fromarray(np.full((16, 20), 77, np.uint8), "L").save(odd / "grey.png")
    rgba = np.dstack([_rgb(1), np.full((16, 20), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(odd / "rgba.png")
    Image.fromarray(_rgb(2)).convert("P", palette=Image.Palette.ADAPTIVE).save(odd / "palette.png")
    sixteen = np.full((16, 20), 65535, np.uint16)
    sixteen[:, :10] = 257 * 100
    Image.fromarray(sixteen).save(odd / "sixteen.png")
    assert Image.open(odd / "sixteen.png").mode.startswith("I")
    Image.new("CMYK", (20, 16), (0, 255, 255, 0)).save(odd / "cmyk.jpg", "JPEG")
    frames = [Image.fromarray(_rgb(s)).convert("P") for s in (3, 4)]
    frames[0].save(odd / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.fromarray(_rgb(5)).save(odd / "bitmap.bmp")
    Image.fromarray(_rgb(6)).save(odd / "UPPER.JPEG")
    for i in range(2):
        (plain / f"p{i}.jpg").write_bytes(_jpeg_bytes(i))
    return root


def test_scan_folder_accepts_every_mode_and_format_as_rgb(odd_formats):
    folder = scan_folder(odd_formats, (16, 16))

    names = {Path(p).name for p, _ in folder.items}
    assert names == {"grey.png", "rgba.png", "palette.png", "sixteen.png", "cmyk.jpg",
                     "anim.gif", "bitmap.bmp", "UPPER.JPEG", "p0.jpg", "p1.jpg"}
    assert folder.skipped == ()
    assert folder.class_names == ("odd", "plain")
    assert folder.counts() == {"odd": 8, "plain": 2}
    for path, _ in folder.items:
        pixels = load_image(path, (16, 16))
        assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    grey = load_image(odd_formats / "odd" / "grey.png", (16, 20))
    assert (grey == 77).all()  # grey becomes R = G = B
    sixteen = load_image(odd_formats / "odd" / "sixteen.png", (16, 20), resample="nearest")
    assert (sixteen[:, :10] == 100).all() and (sixteen[:, 10:] == 255).all()  # scaled, not clipped
    cmyk = load_image(odd_formats / "odd" / "cmyk.jpg", (16, 20))
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 60  # CMYK (0,255,255,0) is red


@pytest.fixture
def broken(tmp_path) -> Path:
    root = tmp_path / "data"
    good, bad = root / "good", root / "bad"
    good.mkdir(parents=True)
    bad.mkdir()
    for i in range(2):
        (good / f"g{i}.jpg").write_bytes(_jpeg_bytes(i))
        (bad / f"ok{i}.jpg").write_bytes(_jpeg_bytes(10 + i))
    jpeg = _jpeg_bytes(7)
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not a JPEG\n")
    (good / "notes.txt").write_text("a note")
    (good / "labels.csv").write_text("a,b\n")
    (good / ".DS_Store").write_bytes(b"\0\0")
    return root


def test_scan_folder_skips_and_lists_unreadable_files(broken):
    folder = scan_folder(broken, (16, 16))

    assert sorted(Path(p).name for p, _ in folder.items) == ["g0.jpg", "g1.jpg", "ok0.jpg",
                                                             "ok1.jpg"]
    reasons = {Path(p).name: reason for p, reason in folder.skipped}
    assert set(reasons) == {"truncated.jpg", "empty.png", "text.jpg", "notes.txt", "labels.csv"}
    for name in ("truncated.jpg", "empty.png", "text.jpg"):
        assert name in reasons[name]  # the reason names the file
    assert "extension" in reasons["notes.txt"] and "extension" in reasons["labels.csv"]
    assert all(str(broken) in p for p, _ in folder.skipped)  # full paths, so the user finds them


def test_scan_folder_strict_names_the_first_unreadable_file(broken):
    (broken / "good" / "notes.txt").unlink()
    (broken / "good" / "labels.csv").unlink()
    with pytest.raises(EdgetlError) as e:
        scan_folder(broken, (16, 16), strict=True)
    message = str(e.value)
    assert "--strict" in message and "3 unreadable" in message
    assert any(name in message for name in ("truncated.jpg", "empty.png", "text.jpg"))


def test_scan_folder_class_names_are_sorted_folder_names_with_unicode_and_spaces(tmp_path):
    root = tmp_path / "data"
    names = ["zebra stripes", "Ärger", "café au lait", "日本 の 猫", "B", "a"]
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        (root / name / f"{name} {i}.jpg").write_bytes(_jpeg_bytes(i))
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(_jpeg_bytes(9))

    folder = scan_folder(root, (16, 16))

    assert folder.class_names == tuple(sorted(names))
    assert len(folder.items) == len(names)
    for path, label in folder.items:
        assert Path(path).parent.name == folder.class_names[label]


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("file", "is not a folder"),
    ("empty", "no class sub-folders"),
    ("one_class", "at least 2"),
    ("empty_class", "no readable images"),
])
def test_scan_folder_refuses_unusable_folders_naming_them(tmp_path, case, needle):
    root = tmp_path / "data"
    if case == "file":
        root.write_text("x")
    elif case != "missing":
        root.mkdir()
    if case in ("one_class", "empty_class"):
        (root / "cats").mkdir()
        (root / "cats" / "c.jpg").write_bytes(_jpeg_bytes())
    if case == "empty_class":
        (root / "dogs").mkdir()
    with pytest.raises(EdgetlError) as e:
        scan_folder(root, (16, 16))
    assert needle in str(e.value)
    assert str(root) in str(e.value)
    if case == "empty_class":
        assert "dogs" in str(e.value)


def test_scan_folder_with_known_classes_maps_labels_and_refuses_unknown(tmp_path):
    root = tmp_path / "val"
    (root / "dog").mkdir(parents=True)
    (root / "dog" / "d.jpg").write_bytes(_jpeg_bytes())
    folder = scan_folder(root, (16, 16), class_names=["cat", "dog"])
    assert folder.items == ((str(root / "dog" / "d.jpg"), 1),)
    assert folder.class_names == ("cat", "dog")
    (root / "horse").mkdir()
    with pytest.raises(EdgetlError, match="horse"):
        scan_folder(root, (16, 16), class_names=["cat", "dog"])


def test_scan_folder_keeps_pixels_within_its_budget_and_training_batches_are_the_same(
        synth, monkeypatch):
    """Kept pixels are the runner's own decode, and a dataset fed from them gives the very
    batches (order, shuffle, augmentation) of one that decodes the files itself."""
    import edgetl.data as data
    from edgetl.backbones import get_backbone, preprocessing

    folder = scan_folder(synth, (24, 24), keep_pixels=True)
    assert set(folder.pixels) == {p for p, _ in folder.items}
    path = folder.items[3][0]
    np.testing.assert_array_equal(folder.pixels[path], load_image(path, (24, 24)))
    assert scan_folder(synth, (24, 24)).pixels is None  # only when asked

    prep = preprocessing(get_backbone("mobilenetv2"))
    items = list(folder.items)
    for training, augment in ((False, False), (True, False), (True, True)):
        kept = data.make_dataset(items, (24, 24), prep, 16, training, augment, 3,
                                 pixels=folder.pixels)
        decoded = data.make_dataset(items, (24, 24), prep, 16, training, augment, 3)
        for epoch in range(2):
            pairs = list(zip(kept, decoded))
            assert len(pairs) == -(-len(items) // 16)
            for (xa, ya), (xb, yb) in pairs:
                np.testing.assert_array_equal(ya.numpy(), yb.numpy())
                np.testing.assert_allclose(xa.numpy(), xb.numpy(), atol=1e-5)

    # pixels of another size are not used: the dataset decodes at its own size
    x, _ = next(iter(data.make_dataset(items, (32, 32), prep, 4, False, False, 0,
                                       pixels=folder.pixels)))
    assert x.shape == (4, 32, 32, 3)

    n = len(folder.items)
    monkeypatch.setattr(data, "KEEP_PIXELS_BYTES", n * 24 * 24 * 3 - 1)
    assert scan_folder(synth, (24, 24), keep_pixels=True).pixels is None


def test_augmentation_is_seeded_new_each_epoch_and_keeps_the_pixel_range(synth):
    from edgetl.backbones import get_backbone, preprocessing
    from edgetl.data import make_dataset

    items = list(scan_folder(synth, (24, 24)).items)
    prep = preprocessing(get_backbone("mobilenetv2"))

    def epochs(seed, n=2):
        ds = make_dataset(items, (24, 24), prep, 64, True, True, seed)
        return [np.concatenate([x.numpy() for x, _ in ds]) for _ in range(n)]

    a1, a2 = epochs(1)
    b1, b2 = epochs(1)
    c1, _ = epochs(2)
    np.testing.assert_array_equal(a1, b1)  # same seed, same augmentation
    np.testing.assert_array_equal(a2, b2)
    assert not np.array_equal(a1, a2)  # a new draw every epoch
    assert not np.array_equal(a1, c1)
    assert a1.min() >= -1.0 and a1.max() <= 1.0  # 0..255 kept, then (x - 127.5) / 127.5
    plain = np.concatenate([x.numpy() for x, _ in make_dataset(items, (24, 24), prep, 64, True,
                                                               False, 1)])
    assert not np.allclose(np.sort(a1.ravel()), np.sort(plain.ravel()))  # it did augment


# --- splits, weights, samples -------------------------------------------------------------------


def _items(counts: dict[int, int]) -> list:
    return [(f"c{c}/img{i:03d}.png", c) for c, n in counts.items() for i in range(n)]


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 25), min_size=1, max_size=5),
       fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2 ** 31 - 1))
def test_stratified_split_properties(counts, fraction, seed):
    items = _items(dict(enumerate(counts)))
    train, val = stratified_split(items, fraction, seed)

    assert stratified_split(items, fraction, seed) == (train, val)  # seeded: reproducible
    assert sorted(train + val) == sorted(items) and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    n_val = Counter(label for _, label in val)
    for label, n in enumerate(counts):
        if n == 1:
            assert n_val[label] == 0  # a single image goes to training
        else:
            expected = min(max(int(round(n * fraction)), 1), n - 1)
            assert n_val[label] == expected  # stratified, >= 1 on each side


def test_stratified_split_depends_on_the_seed_and_refuses_bad_fractions():
    items = _items({0: 20, 1: 20, 2: 20})
    assert stratified_split(items, 0.25, 0)[1] != stratified_split(items, 0.25, 1)[1]
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(EdgetlError, match=str(bad)):
            stratified_split(items, bad, 0)


def test_class_weights_are_sklearn_balanced():
    items = _items({0: 10, 1: 30, 2: 20})
    w = class_weights(items, 3)
    assert w == pytest.approx({0: 60 / (3 * 10), 1: 60 / (3 * 30), 2: 60 / (3 * 20)})
    assert 10 * w[0] == pytest.approx(30 * w[1]) == pytest.approx(20 * w[2])  # equal total
    assert class_weights(_items({0: 4, 2: 4}), 3) == pytest.approx({0: 8 / 12, 2: 8 / 12})


def test_balanced_sample_is_class_balanced_deterministic_and_a_subset():
    items = _items({0: 50, 1: 5, 2: 20})
    sample = balanced_sample(items, 12, seed=3)
    assert Counter(label for _, label in sample) == {0: 4, 1: 4, 2: 4}
    assert balanced_sample(items, 12, seed=3) == sample
    assert balanced_sample(list(reversed(items)), 12, seed=3) == sample  # input order is irrelevant
    assert balanced_sample(items, 12, seed=4) != sample
    assert len(set(sample)) == 12 and set(sample) <= set(items)

    big = balanced_sample(items, 30, seed=0)
    c = Counter(label for _, label in big)
    assert c[1] == 5  # a small class gives all it has, the others share the rest evenly
    assert sum(c.values()) == 30 and abs(c[0] - c[2]) <= 1
    assert sorted(balanced_sample(items, 1000, seed=0)) == sorted(items)


# --- built-in datasets --------------------------------------------------------------------------


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_make_synth_is_byte_identical_for_a_seed(tmp_path):
    counts = make_synth(tmp_path / "a", classes=3, per_class=4, size=24, seed=5)
    make_synth(tmp_path / "b", classes=3, per_class=4, size=24, seed=5)
    make_synth(tmp_path / "c", classes=3, per_class=4, size=24, seed=6)

    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert counts == {"circle": 4, "cross": 4, "square": 4}
    assert len(a) == 12 and a == b
    assert set(a) == set(c) and a != c
    folder = scan_folder(tmp_path / "a", (24, 24))
    assert folder.class_names == ("circle", "cross", "square") and not folder.skipped
    assert Image.open(tmp_path / "a" / "circle" / "circle_0000.png").size == (24, 24)


def test_make_synth_never_clobbers_without_overwrite(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(EdgetlError, match="--overwrite"):
        make_synth(out, classes=2, per_class=1, size=16)
    assert _tree(out) == {"mine.txt": b"keep"}
    make_synth(out, classes=2, per_class=1, size=16, overwrite=True)
    assert sorted(_tree(out)) == ["circle/circle_0000.png", "cross/cross_0000.png"]
    for bad in (dict(classes=1), dict(classes=7), dict(per_class=0), dict(size=8)):
        with pytest.raises(EdgetlError):
            make_synth(tmp_path / "x", **bad)
        assert not (tmp_path / "x").exists()


def test_a_tiny_model_learns_the_synth_set(learnable, tmp_path):
    """MobileNetV2 0.35 at 48 px from scratch, whole base trained: clearly above chance (0.25)."""
    from edgetl.train import train

    cfg = tiny_config(learnable, tmp_path / "run", input_size=48, strategy="fine-tune",
                      unfreeze_from="Conv1", fine_tune_lr=3e-3, epochs=LEARN_EPOCHS)
    result = train(cfg)

    with open(Path(result.run_dir) / "history.csv") as f:
        history = list(csv.DictReader(f))
    curve = [round(float(r["val_accuracy"]), 2) for r in history]
    assert result.val_accuracy > 0.5, f"val accuracy per epoch: {curve}"
    assert float(history[-1]["loss"]) < float(history[0]["loss"])


LEARN_EPOCHS = 10


def _write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_idx_to_folders_writes_class_folders_of_pngs(tmp_path, gz):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (9, 6, 5)).astype(np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1], np.uint8)
    ext = ".gz" if gz else ""
    img_file = _write_idx(tmp_path / f"img.idx{ext}", images, gz)
    lab_file = _write_idx(tmp_path / f"lab.idx{ext}", labels, gz)
    names = tmp_path / "names.txt"
    names.write_text("zero\none/uno\ntwo\n\n")
    assert (read_idx(img_file) == images).all()

    counts = idx_to_folders(str(img_file), str(lab_file), tmp_path / "out", names=str(names),
                            limit=3)

    assert counts == {"zero": 3, "one_uno": 3, "two": 2}  # limit: the first 3 of class 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["one_uno", "two", "zero"]
    assert sorted(p.name for p in (out / "zero").iterdir()) == ["00000.png", "00003.png",
                                                              "00006.png"]
    assert (np.asarray(Image.open(out / "two" / "00005.png")) == images[5]).all()  # lossless
    folder = scan_folder(out, (6, 5))
    assert folder.counts() == {"one_uno": 3, "two": 2, "zero": 3}


def test_idx_errors_name_the_file(tmp_path):
    images = _write_idx(tmp_path / "img", np.zeros((3, 4, 4), np.uint8))
    labels = _write_idx(tmp_path / "lab", np.array([0, 1, 2], np.uint8))
    short = _write_idx(tmp_path / "short", np.zeros((2,), np.uint8))
    truncated = tmp_path / "trunc"
    truncated.write_bytes(images.read_bytes()[:-5])
    not_idx = tmp_path / "notidx"
    not_idx.write_bytes(b"\x89PNG....")
    cases = [
        (lambda: read_idx(truncated), "truncated"),
        (lambda: read_idx(not_idx), "not an unsigned-byte IDX"),
        (lambda: read_idx(tmp_path / "nope"), "does not exist"),
        (lambda: idx_to_folders(str(images), str(short), tmp_path / "o1"),
         r"\(shape 3x4x4\) and .* \(shape 2\) do not match"),
        (lambda: idx_to_folders(str(labels), str(images), tmp_path / "o3"),
         "holds labels and .* images: give the images file first"),
        (lambda: idx_to_folders(str(images), str(labels), tmp_path / "o2", names="mnist2"),
         "--names 'mnist2'"),
    ]
    for call, needle in cases:
        with pytest.raises(EdgetlError, match=needle):
            call()
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_idx_to_folders_on_real_fashion_mnist(tmp_path):
    root = realdata("fashion-mnist")
    counts = idx_to_folders(str(root / "t10k-images-idx3-ubyte.gz"),
                            str(root / "t10k-labels-idx1-ubyte.gz"), tmp_path / "fm", limit=5)

    assert counts == {name: 5 for name in FASHION_MNIST}
    dirs = sorted(p for p in (tmp_path / "fm").iterdir())
    assert [d.name for d in dirs] == sorted(FASHION_MNIST)
    for d in dirs:
        pngs = sorted(d.iterdir())
        assert len(pngs) == 5 and all(p.suffix == ".png" for p in pngs)
        with Image.open(pngs[0]) as img:
            assert img.size == (28, 28) and img.mode == "L"
    folder = scan_folder(tmp_path / "fm", (28, 28))
    assert len(folder.items) == 50 and not folder.skipped
