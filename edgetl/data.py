"""Class folders -> checked image lists, splits, tf.data pipelines, calibration samples, and the
built-in datasets (a generated shapes set and an IDX converter for MNIST / Fashion-MNIST).

Images are decoded by the device runner's ``load_image`` so that training, calibration and the
device see identical pixels.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import unicodedata
import struct
import zlib
from collections import Counter
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetl.errors import EdgetlError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}  # the common ones; see image_extensions
# Pillow formats never read from a data folder: EPS runs Ghostscript (an external program).
NOT_READ_FORMATS = {"EPS"}
DECODE_CHUNK = 32  # images decoded per Python call by the decoding pool (make_dataset)
# scan_folder keeps the pixels it decodes when they fit in this, so that training does not decode
# every image a second time in its first epoch (benchmarks/run.py, section 6).
KEEP_PIXELS_BYTES = 1 << 30
# make_dataset decodes in a pool of processes (edgetl/decode.py), one per core, when it decodes
# more than this (pixels at the model's size): the train and validation splits of a folder whose
# pixels scan_folder did not keep are well over it, and a pool's start (~0.5 s) pays off.
POOL_DECODE_BYTES = 32 << 20
# ... and only when the files are photo-sized: small files (28 px PNGs, ~1 KB) decode faster
# in this process than a pool can ship their pixels (0.74-1.03x), 1200x900 JPEGs gain 1.2-2.4x
# (benchmarks/results/2026-11-30-decode.md).
POOL_MIN_FILE_BYTES = 32 << 10


def _mean_file_bytes(paths, sample: int = 256) -> float:
    """The mean size of ``paths``' files, from an evenly spaced sample (unreadable ones: 0)."""
    if not paths:
        return 0.0
    step = max(1, len(paths) // sample)
    sizes = []
    for p in paths[::step]:
        try:
            sizes.append(os.path.getsize(p))
        except OSError:
            sizes.append(0)
    return sum(sizes) / len(sizes)


@dataclass(frozen=True)
class ImageFolder:
    """A checked class-folder dataset.

    Attributes:
        root: the folder given by the user.
        class_names: sorted sub-folder names; the label of class i is class_names[i].
        items: (path, class index) of every readable image, sorted.
        skipped: (path, reason) of every file that is not a readable image.
        pixels: path -> decoded uint8 image at the scan size, when kept (see scan_folder).
        pixels_note: one line for the user about where the pixels are kept, or why not.
    """

    root: str
    class_names: tuple
    items: tuple
    skipped: tuple
    pixels: dict | None = field(default=None, repr=False, compare=False)
    pixels_note: str | None = field(default=None, repr=False, compare=False)

    def counts(self) -> dict:
        c = Counter(label for _, label in self.items)
        return {name: c.get(i, 0) for i, name in enumerate(self.class_names)}


def _class_dirs(root: Path) -> list[Path]:
    from edgetl.runner import path_problem

    if not root.exists():
        raise EdgetlError(path_problem(root, "data folder", "folder",  # or a symlink loop
                                       missing=f"data folder '{root}' does not exist"))
    if not root.is_dir() and not root.is_file():  # a FIFO, a socket: named
        raise EdgetlError(f"{path_problem(root, 'data folder', 'folder')}: give a folder with "
                          "one sub-folder per class")
    if not root.is_dir():
        raise EdgetlError(f"data folder '{root}' is not a folder: give a folder with one "
                          "sub-folder per class")
    top = os.path.realpath(root)
    for p in root.iterdir():
        if p.name.startswith(".") or not p.is_symlink():
            continue
        try:
            target = os.path.realpath(p, strict=True)
        except (OSError, RuntimeError):  # a loop (ELOOP) or a dangling link
            raise EdgetlError(f"class folder '{p}' is a broken symlink or a symlink loop (it "
                              f"points to '{os.readlink(p)}'): fix or remove it") from None
        if os.path.isdir(target) and _is_within(top, target):
            raise EdgetlError(f"class folder '{p}' is a symlink loop: it points back to "
                              f"'{target}', which contains the data folder; remove it")
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)
    if not dirs:
        raise EdgetlError(f"data folder '{root}' has no class sub-folders: put each class's "
                          "images in a sub-folder named after the class")
    return dirs


def _is_within(path: str, folder: str) -> bool:
    """True when real path ``path`` is ``folder`` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def image_extensions() -> frozenset:
    """Every file extension Pillow can open (WebP, TIFF, ...), plus the common ones."""
    global _EXTENSIONS
    if _EXTENSIONS is None:
        from PIL import Image

        Image.init()
        _EXTENSIONS = frozenset(IMAGE_EXTENSIONS | {
            ext.lower() for ext, fmt in Image.registered_extensions().items()
            if fmt in Image.OPEN and fmt not in NOT_READ_FORMATS})
    return _EXTENSIONS


_EXTENSIONS = None


def _not_regular(path: Path) -> str | None:
    """Why a path is not a regular file (FIFO, socket, device, broken link), or None.

    Checked with stat only: opening a FIFO blocks until someone writes to it."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"cannot stat it ({e.strerror}; a broken symlink?)"
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder"
            if stat.S_ISDIR(mode) else "not a regular file")
    return f"not a regular file: {kind}, never opened"


def _walk_images(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Regular image files under folder (recursively), not following symlinked folders into
    loops; everything else is returned with the reason it is left out."""
    extensions = image_extensions()
    found, other = [], []
    seen = set()
    top = os.path.realpath(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real != top and _is_within(top, real):  # e.g. 'up -> ..': would relabel other classes
            other.append((dirpath, "symlink loop to a parent folder (skipped)"))
            dirnames[:] = []
            continue
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith("."):
                continue
            odd = _not_regular(p)
            if odd:
                other.append((str(p), odd))
            elif p.suffix.lower() in extensions:
                found.append(p)
            else:
                other.append((str(p), f"not an image file (extension "
                                      f"'{p.suffix or p.name}' is not a format Pillow reads)"))
    return found, other


def scan_folder(root: str | os.PathLike, size: tuple[int, int] | None = None,
                class_names: list[str] | None = None, strict: bool = False,
                min_classes: int = 2, keep_pixels: bool = False,
                on_image=None, spill_dir: str | os.PathLike | None = None,
                channels: int = 3) -> ImageFolder:
    """Lists and checks a class-folder dataset; every image is decoded once in parallel.

    Args:
        root: folder with one sub-folder per class.
        size: decode check size (h, w); small is fine, the point is a full decode.
        class_names: expected classes (e.g. from a run); sub-folders must match them.
        strict: unreadable files are an error instead of being skipped.
        min_classes: fewer classes than this is an error.
        keep_pixels: keep the decoded images (at ``size``) for make_dataset: in memory when
            all of them fit in KEEP_PIXELS_BYTES, else in a temporary file in ``spill_dir``
            (see disk_store), so that no epoch decodes them again.
        on_image: called with no argument after each image is decoded (from worker threads):
            progress.
        spill_dir: where pixels over KEEP_PIXELS_BYTES are kept (train: the run folder);
            None: they are not kept.
        channels: 3 (RGB) or 1 (greyscale): the images are decoded (and kept) as the model
            takes them (see load_pixels).
    """
    from edgetl.runner import RunnerError, load_image

    root = Path(root)
    dirs = _class_dirs(root)
    names = [d.name for d in dirs]
    for n in names:
        # A class name becomes a label: printed by every report and written into labels.txt.
        # (Bidi overrides too: they reorder what a terminal shows; other format characters
        # such as the zero-width non-joiner belong to ordinary Persian or Hindi words.)
        if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") or "\u202a" <= c <= "\u202e"
               or "\u2066" <= c <= "\u2069" for c in n):
            raise EdgetlError(f"class folder {n!r} in '{root}' has control characters in its "
                              "name (labels are printed and written one per line): rename it")
    seen: dict = {}
    for n in names:  # 'café' typed on a Mac (NFD) and elsewhere (NFC): two labels that look alike
        twin = seen.setdefault(unicodedata.normalize("NFC", n), n)
        if twin != n:
            raise EdgetlError(f"class folders {twin!r} and {n!r} in '{root}' are the same name "
                              "written with different Unicode characters (NFC and NFD forms): "
                              "their labels would look identical; merge them or rename one")
    if class_names is not None:
        unknown = [n for n in names if n not in class_names]
        if unknown:
            raise EdgetlError(
                f"folder '{root}' has classes the model does not know: {', '.join(unknown)} "
                f"(model classes: {', '.join(class_names)})")
        index = {n: class_names.index(n) for n in names}
    else:
        if len(names) < min_classes:
            raise EdgetlError(f"data folder '{root}' has {len(names)} class folder(s) "
                              f"({', '.join(names)}); a classifier needs at least {min_classes}")
        index = {n: i for i, n in enumerate(names)}
    candidates, skipped = [], []
    for d in dirs:
        files, other = _walk_images(d)
        skipped.extend(other)
        candidates.extend((p, index[d.name]) for p in files)

    check = size or (32, 32)
    store, note = None, None
    if keep_pixels and size is not None and candidates:
        shape = (len(candidates), check[0], check[1], channels)
        if int(np.prod(shape)) <= KEEP_PIXELS_BYTES:
            store = np.empty(shape, np.uint8)
        elif spill_dir is not None:
            store, note = disk_store(spill_dir, shape)

    def ok(i):
        try:
            img = load_image(candidates[i][0], check, channels=channels)
            if store is not None:
                store[i] = img
            return None
        except RunnerError as e:
            return str(e)
        finally:
            if on_image is not None:
                on_image()

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        results = list(pool.map(ok, range(len(candidates))))
    items, pixels = [], {} if store is not None else None
    for i, ((p, label), problem) in enumerate(zip(candidates, results)):
        if problem is None:
            items.append((str(p), label))
            if store is not None:
                pixels[str(p)] = store[i]
        else:
            skipped.append((str(p), problem))
    if strict and skipped:
        path, reason = skipped[0]
        raise EdgetlError(f"--strict: {len(skipped)} unreadable file(s), first '{path}': {reason}")
    present = Counter(label for _, label in items)
    if class_names is None:
        empty = [n for n in names if present.get(index[n], 0) == 0]
        if empty:
            folder = root / empty[0]
            left = [(p, why) for p, why in skipped
                    if _is_within(os.path.abspath(p), os.path.abspath(folder))]
            why = ""
            if left:
                exts = sorted({Path(p).suffix.lower() or Path(p).name for p, _ in left})
                why = (f" (it has {len(left)} file(s) left out: {', '.join(exts[:5])}; e.g. "
                       f"'{left[0][0]}': {left[0][1]}; edgetl reads JPEG, PNG, WebP, TIFF, BMP, "
                       "GIF and every other format Pillow opens)")
            raise EdgetlError(f"class folder '{folder}' has no readable images{why}: add "
                              "images or remove the folder")
    elif not items:
        raise EdgetlError(f"folder '{root}' has no readable images")
    out_names = tuple(class_names) if class_names is not None else tuple(names)
    return ImageFolder(str(root), out_names, tuple(items), tuple(skipped), pixels, note)


def _mb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _reserve(f, size: int) -> None:
    """Allocates ``size`` bytes of disk to the open file ``f`` (OSError ENOSPC if they are not
    there): writing to a mapped file whose blocks cannot be allocated kills the process."""
    import errno

    try:
        os.posix_fallocate(f.fileno(), 0, size)
        return
    except AttributeError:  # macOS, Windows: no posix_fallocate
        pass
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    zeros = bytes(16 << 20)  # a file system without fallocate: write the zeros
    left = size
    while left:
        left -= f.write(zeros[:min(left, len(zeros))])
    f.flush()


def disk_store(folder, shape: tuple) -> tuple[np.ndarray | None, str]:
    """A uint8 array of ``shape`` in a temporary file in ``folder`` (it has no name: it is gone
    when the last view of it is, also when the process is killed), with its disk space
    reserved up front so that a full disk fails here, not as a crash mid-epoch; or None when
    it would take over half the free space or cannot be made. Returns (array, note): the
    note is one line saying where the pixels are, or why they are not kept."""
    import tempfile

    need = int(np.prod(shape))
    folder = os.fspath(folder)
    again = "every epoch decodes the images again"
    try:
        free = shutil.disk_usage(folder).free
    except OSError as e:
        return None, f"note: cannot keep the decoded images in '{folder}' ({e.strerror}): {again}"
    if need > free // 2:
        return None, (f"note: the decoded images ({_mb(need)}) would take over half the free "
                      f"space of '{folder}' ({_mb(free)} free): {again}")
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            _reserve(f, need)
            array = np.memmap(f, np.uint8, "r+", shape=shape)  # the mapping keeps the file
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
        return None, f"note: cannot keep the decoded images in '{folder}' ({why}): {again}"
    return array, (f"decoded images kept in a temporary file in '{folder}' ({_mb(need)}, "
                   "removed when training ends)")


def stratified_split(items, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded per-class split; every class with >= 2 images keeps at least one on each side."""
    if not 0.0 < fraction < 1.0:
        raise EdgetlError(f"--val-split {fraction} must be between 0 and 1 (e.g. 0.2)")
    rng = np.random.RandomState(seed)
    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    train, val = [], []
    for label in sorted(by_class):
        group = sorted(by_class[label])
        order = rng.permutation(len(group))
        n_val = int(round(len(group) * fraction))
        if len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        else:
            n_val = 0
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return sorted(train), sorted(val)


def file_sha256(path) -> str:
    """The SHA-256 (hex) of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_hash(items) -> str:
    """A hash of the (path, label) list and file sizes: which data a run saw."""
    h = hashlib.sha256()
    for path, label in items:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = -1
        h.update(f"{path}\t{label}\t{size}\n".encode())
    return h.hexdigest()


def class_weights(items, n_classes: int) -> dict[int, float]:
    """Inverse-frequency weights (sklearn's 'balanced'): n / (k * count)."""
    counts = Counter(label for _, label in items)
    n = len(items)
    return {c: n / (n_classes * counts[c]) for c in range(n_classes) if counts.get(c)}


def normalize(x, prep: dict):
    """(x - mean) / std on float pixels 0..255, in the family's channel order (tf ops)."""
    from edgetl.keras import tf

    if prep["channel_order"] == "BGR":
        x = x[..., ::-1]
    mean = tf.constant(prep["mean"], tf.float32)
    std = tf.constant(prep["std"], tf.float32)
    return (x - mean) / std


def augment_ops(augment) -> tuple[str, ...]:
    """make_dataset's ``augment`` as transform names: True (all four, as before --augment
    existed), False/None (none), a comma-separated string or a sequence of names."""
    from edgetl.config import AUGMENTATIONS, parse_augment

    if augment is True:
        return AUGMENTATIONS
    if not augment:
        return ()
    return parse_augment(augment if isinstance(augment, str) else ",".join(augment))


def load_pixels(path, size: tuple[int, int], channels: int = 3) -> np.ndarray:
    """One image as uint8 pixels (height, width, channels), decoded by the device runner's
    ``load_image``: for 1-channel models grey images stay as they are and colour ones are
    converted (Pillow's convert("L")), exactly as on the device.

    Raises:
        RunnerError: unreadable or not an image.
    """
    from edgetl.runner import load_image

    return load_image(path, size, channels=channels)


def make_dataset(items, size: tuple[int, int], prep: dict, batch_size: int, training: bool,
                 augment, seed: int, cache: bool = True, pixels: dict | None = None,
                 channels: int = 3):
    """tf.data pipeline: parallel decode, cache of decoded pixels, augmentation, prefetch.

    ``size`` is (height, width); ``channels`` 1 makes greyscale images (see load_pixels).
    ``augment`` picks the transforms (see augment_ops); for the same seed and the same choice
    the batches are identical, and each transform draws the same numbers whichever others are
    on. ``pixels`` (from scan_folder, path -> image at ``size`` and ``channels``) replaces the
    decode when it holds every item (read a batch at a time when over KEEP_PIXELS_BYTES: kept
    on disk). Otherwise, over KEEP_PIXELS_BYTES the images are decoded again every epoch
    (memory stays bounded); over POOL_DECODE_BYTES of photo-sized files (POOL_MIN_FILE_BYTES)
    they are decoded in one process per core (edgetl/decode.py, the same load_image and
    order, so the same pixels), else in this process; both keep them for later epochs.
    Returns batches of (normalized float images, int labels).
    """
    from edgetl.keras import tf

    h, w = size
    paths = [p for p, _ in items]
    labels = np.array([label for _, label in items], np.int32)

    # Decoding runs in Python (the runner's load_image, for identical pixels), so it is done
    # a batch per call: one call per image spent more time in tf.data and the GIL than in
    # Pillow (benchmarks/run.py, section 6). Per-image and per-stage maps are likewise folded
    # into one map per batch.
    if pixels is not None and all(
            p in pixels and pixels[p].shape == (h, w, channels) for p in paths):
        if len(paths) * h * w * channels > KEEP_PIXELS_BYTES:
            # Kept on disk by the folder check (disk_store): read a batch at a time, in the
            # epoch's order, instead of copying them all into memory.
            return _decode_in_order(paths, labels, (h, w), channels, prep, batch_size,
                                    training, augment, seed, False,
                                    kept=[pixels[p] for p in paths])
        ds = tf.data.Dataset.from_tensor_slices((np.stack([pixels[p] for p in paths]), labels))
    elif len(paths) * h * w * channels > KEEP_PIXELS_BYTES:
        # Not kept by the folder check (no room on its disk): decoded again every epoch, in
        # its shuffled order, in this process; keeping them in memory could exhaust it.
        return _decode_in_order(paths, labels, (h, w), channels, prep, batch_size, training,
                                augment, seed, False)
    elif (len(paths) * h * w * channels > POOL_DECODE_BYTES
          and _mean_file_bytes(paths) >= POOL_MIN_FILE_BYTES):
        # Not given the folder check's pixels (a greyscale base model, a caller of this
        # function): decode on every core, in order, with the same load_image (TF's decoders
        # and resize give other pixels). The pool lives for one pass.
        from edgetl.decode import decode_chunks

        def chunks():
            starts = range(0, len(paths), DECODE_CHUNK)
            images = decode_chunks((paths[i:i + DECODE_CHUNK] for i in starts), (h, w), channels)
            try:
                for i, img in zip(starts, images):
                    yield img, labels[i:i + DECODE_CHUNK]
            finally:
                images.close()  # stops the pool now, also when the pass is cut short

        ds = tf.data.Dataset.from_generator(chunks, output_signature=(
            tf.TensorSpec((None, h, w, channels), tf.uint8), tf.TensorSpec((None,), tf.int32)))
        ds = ds.unbatch()
        if cache:
            ds = ds.cache()
    else:
        # Decoded in this process, in the epoch's shuffled order, a batch per call: the first
        # batches leave while the rest still decode (shuffling decoded images waited for all
        # of them, so augmentation and training could not overlap decoding). Range(n) shuffled
        # with the same seed and buffer gives the same order as the images shuffled, so the
        # batches are those of the paths above. Decoded pixels are kept for later epochs.
        return _decode_in_order(paths, labels, (h, w), channels, prep, batch_size, training,
                                augment, seed, cache)
    if training:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    return _finish(ds, prep, augment_ops(augment) if training else (), seed)


def _finish(ds, prep: dict, ops: tuple, seed: int):
    """Batches of uint8 images -> normalized floats, augmented by ``ops``, prefetched."""
    from edgetl.keras import tf

    if not ops:
        ds = ds.map(lambda x, y: (normalize(tf.cast(x, tf.float32), prep), y),
                    num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    # Each batch draws its augmentation statelessly from its own seed, taken from a seeded
    # stream that changes every epoch: the same --seed gives the same model in every process.
    # Stateful random ops, called by parallel map workers in no fixed order, did not.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def augmented(batch, pair):
        x, y = batch
        flip_seed, contrast_seed = tf.unstack(
            tf.random.experimental.stateless_split(pair, num=2))
        x = tf.cast(x, tf.float32)
        if {"flip", "rotate", "zoom"} & set(ops):
            x = flip_rotate_zoom(x, flip_seed, rotation=0.05 if "rotate" in ops else 0.0,
                                 zoom=0.1 if "zoom" in ops else 0.0, flip="flip" in ops)
        if "contrast" in ops:
            x = contrast(x, contrast_seed)
        return normalize(x, prep), y

    ds = tf.data.Dataset.zip((ds, seeds)).map(augmented, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _decode_in_order(paths, labels, size, channels, prep, batch_size, training, augment,
                     seed, keep: bool, kept: list | None = None):
    """make_dataset's in-process decode: batches of indices (shuffled as make_dataset shuffles
    images) whose images are decoded when first asked for and, with ``keep``, kept in one
    uint8 array (n, height, width, channels) for the next epochs. ``kept``: the images
    already decoded (arrays on disk, one per path): read instead of decoding."""
    from edgetl.keras import tf

    h, w = size
    n = len(paths)
    store = np.empty((n, h, w, channels), np.uint8) if keep else None  # pages filled as decoded
    done = np.zeros(n, bool)

    def get(idx):
        if not len(idx):
            return np.zeros((0, h, w, channels), np.uint8)
        if kept is not None:
            return np.stack([kept[i] for i in idx])
        if store is None:
            return np.stack([load_pixels(paths[i], size, channels) for i in idx])
        for i in idx[~done[idx]]:  # an epoch's batches hold distinct indices: no two threads
            store[i] = load_pixels(paths[i], size, channels)  # write one image
            done[i] = True
        return store[idx]

    tf_labels = tf.constant(labels)

    def load(idx):
        img = tf.numpy_function(get, [idx], tf.uint8, stateful=False)
        img.set_shape((None, h, w, channels))
        return img, tf.gather(tf_labels, idx)

    ds = tf.data.Dataset.range(n)
    if training:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    # Decoding holds the GIL: one call at a time (several threads contending for it ran
    # slower than one, 4,500 vs 6,500 images/s at 48 px: benchmarks/run.py, section 6).
    calls = 1 if kept is None else tf.data.AUTOTUNE
    ds = ds.batch(batch_size).map(load, num_parallel_calls=calls, deterministic=True)
    return _finish(ds, prep, augment_ops(augment) if training else (), seed)


def contrast(x, seed, factor: float = 0.1):
    """Random contrast per image, as Keras' RandomContrast(factor): pixels move away from (or
    towards) the image's per-channel mean by a factor in [1 - factor, 1 + factor]; 0..255 kept."""
    from edgetl.keras import tf

    f = tf.random.stateless_uniform(tf.stack([tf.shape(x)[0], 1, 1, 1]), seed=seed,
                                    minval=1.0 - factor, maxval=1.0 + factor)
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    return tf.clip_by_value((x - mean) * f + mean, 0.0, 255.0)


def flip_rotate_zoom(x, seed, rotation: float = 0.05, zoom: float = 0.1, flip: bool = True):
    """Random horizontal flip, rotation (+-rotation turns) and zoom (1 +- zoom) of a batch,
    drawn statelessly from ``seed`` (a pair of integers); rotation or zoom 0, or flip False,
    leaves that transform out.

    The same distributions as Keras' RandomFlip, RandomRotation and RandomZoom in a row (same
    matrices, 'reflect' fill, bilinear), composed into one projective transform: one resampling
    instead of three, about half the time of the three layers (benchmarks/run.py, section 6),
    and one interpolation blur instead of two.
    """
    import math

    from edgetl.keras import tf

    shape = tf.shape(x)
    n = shape[0]
    h = tf.cast(shape[1], tf.float32) - 1.0
    w = tf.cast(shape[2], tf.float32) - 1.0
    s_flip, s_theta, s_zoom = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
    flip = tf.cast(tf.random.stateless_uniform([n], seed=s_flip) < (0.5 if flip else 0.0),
                   tf.float32)
    theta = tf.random.stateless_uniform([n], seed=s_theta, minval=-rotation * 2 * math.pi,
                                        maxval=rotation * 2 * math.pi)
    z = 1.0 + tf.random.stateless_uniform([n], seed=s_zoom, minval=-zoom, maxval=zoom)
    c, s = tf.cos(theta), tf.sin(theta)
    # Output -> input coordinates: flip(rotate(zoom(p))), each as Keras builds its matrix.
    rx, ry = (w - (c * w - s * h)) / 2.0, (h - (s * w + c * h)) / 2.0
    zx, zy = w / 2.0 * (1.0 - z), h / 2.0 * (1.0 - z)
    sign = 1.0 - 2.0 * flip
    a0, a1, a2 = sign * c * z, -sign * s * z, sign * (c * zx - s * zy + rx) + flip * w
    b0, b1, b2 = s * z, c * z, s * zx + c * zy + ry
    zeros = tf.zeros_like(a0)
    m = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=m, output_shape=shape[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT")


def balanced_sample(items, count: int, seed: int) -> list:
    """A class-balanced, seeded sample of ``count`` items (round-robin over shuffled classes)."""
    rng = np.random.RandomState(seed)
    by_class: dict[int, list] = {}
    for item in sorted(items):
        by_class.setdefault(item[1], []).append(item)
    queues = {c: [g[i] for i in rng.permutation(len(g))] for c, g in by_class.items()}
    out = []
    while len(out) < count and any(queues.values()):
        for c in sorted(queues):
            if queues[c] and len(out) < count:
                out.append(queues[c].pop(0))
    return out


# --- built-in datasets --------------------------------------------------------------------------

SYNTH_CLASSES = ("circle", "cross", "square", "triangle", "ring", "stripes")


def _draw(kind: str, size: int, rng: np.random.RandomState, hue: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.18, 0.3) * size
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        mask = dy ** 2 + dx ** 2 <= r ** 2
    elif kind == "ring":
        d = np.sqrt(dy ** 2 + dx ** 2)
        mask = (d <= r) & (d >= r * 0.6)
    elif kind == "square":
        mask = (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    elif kind == "cross":
        t = r * 0.3
        mask = ((np.abs(dy) <= t) & (np.abs(dx) <= r)) | ((np.abs(dx) <= t) & (np.abs(dy) <= r))
    elif kind == "triangle":
        mask = (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    else:  # stripes
        period = rng.uniform(0.12, 0.2) * size
        mask = ((xx + yy * rng.uniform(-0.3, 0.3)) // (period / 2)) % 2 == 0
        mask &= (np.abs(dy) <= r) & (np.abs(dx) <= r)
    bg = rng.uniform(0, 110, 3)
    # Each class leans to its own hue (with jitter and overlap) so that a small CNN learns the
    # set in a few epochs from scratch; the shape carries the rest of the signal.
    import colorsys

    h = (hue + rng.normal(0, 0.06)) % 1.0
    fg = np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.5, 1.0), rng.uniform(0.7, 1.0))) * 255
    img = np.empty((size, size, 3), np.float32)
    img[:] = bg
    img[mask] = fg
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_synth(out: str | os.PathLike, classes: int = 4, per_class: int = 60, size: int = 64,
               seed: int = 0, overwrite: bool = False) -> dict:
    """Writes a deterministic shapes dataset (PNG, one folder per class) that a CNN can learn.

    Returns {class name: image count}.
    """
    from PIL import Image

    if not 2 <= classes <= len(SYNTH_CLASSES):
        raise EdgetlError(f"--classes {classes} must be between 2 and {len(SYNTH_CLASSES)}")
    from edgetl.config import MAX_SEED, check_number, parse_input_size

    check_number("--per-class", per_class, integer=True, low=1, high=100_000)
    parse_input_size(size, "--size")
    check_number("--seed", seed, integer=True, low=0, high=MAX_SEED)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EdgetlError(f"'{out}' is a file, not a folder: choose another OUT folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EdgetlError(f"'{out}' exists and is not empty: choose another folder or pass "
                          "--overwrite")
    rng = np.random.RandomState(seed)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp-synth")  # one per process
    counts = {}
    with _writing_folder(out, tmp):
        _rmtree(tmp)
        for kind in SYNTH_CLASSES[:classes]:
            (tmp / kind).mkdir(parents=True)
            for i in range(per_class):
                hue = SYNTH_CLASSES.index(kind) / classes
                Image.fromarray(_draw(kind, size, rng, hue)).save(
                    tmp / kind / f"{kind}_{i:04d}.png")
            counts[kind] = per_class
        _publish(tmp, out, overwrite)
    return counts


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Renames the finished ``tmp`` folder to ``out``. Without ``overwrite`` an ``out`` that
    another command filled meanwhile is refused (the rename fails on a non-empty folder)."""
    import errno

    aside = None
    if overwrite and os.path.lexists(out):
        # Set aside, not deleted first: a failure or Ctrl-C before the new folder is in place
        # puts the old one back (deleting a big dataset first lost both).
        aside = out.with_name(f".{out.name}.{os.getpid()}.replaced")
        os.rename(out, aside)
    elif out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(tmp, out)
    except BaseException as e:
        if aside is not None and not os.path.lexists(out):
            os.rename(aside, out)
        if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise EdgetlError(f"'{out}' exists and is not empty (another command wrote it "
                              "meanwhile?): choose another folder or pass --overwrite") from None
        raise
    if aside is not None:
        _rmtree(aside)


@contextmanager
def _writing_folder(out: Path, tmp: Path):
    """Around writing ``tmp`` and renaming it to ``out``: on any failure ``tmp`` is removed,
    and a fault of the machine (a full disk, a read-only folder) is one line naming ``out``."""
    try:
        yield
    except BaseException as e:
        try:
            _rmtree(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise EdgetlError(f"cannot read or write '{out}': {e.strerror or e}") from None
        raise


FASHION_MNIST = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot")
MNIST = tuple(str(i) for i in range(10))


# The largest IDX payload read (MNIST's training images are 47 MB): more is a corrupt header
# or a gzip bomb, and would be held in memory at once.
MAX_IDX_BYTES = 1 << 30


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (optionally gzipped): MNIST / Fashion-MNIST images or labels.

    Only the bytes the header declares are read (at most MAX_IDX_BYTES), so a gzip bomb or a
    corrupt header costs no memory.

    Raises:
        EdgetlError: missing, not a regular file, not an unsigned-byte IDX file, truncated, or
            implausibly large.
    """
    from edgetl.runner import path_problem

    path = Path(path)
    problem = path_problem(path, "IDX file",  # a symlink loop, a FIFO, a folder, ...
                           missing=f"IDX file '{path}' does not exist")
    if problem:
        raise EdgetlError(problem)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise EdgetlError(f"'{path}' is not an unsigned-byte IDX file (MNIST format)")
            ndim = head[3]
            dims = f.read(4 * ndim)
            if ndim < 1 or len(dims) < 4 * ndim:
                raise EdgetlError(f"'{path}' has a corrupt IDX header")
            shape = struct.unpack(f">{ndim}I", dims)
            n = int(np.prod(shape, dtype=object))
            if n > MAX_IDX_BYTES:
                raise EdgetlError(f"'{path}' header says {shape}: {n} bytes, more than the "
                                  f"{MAX_IDX_BYTES >> 20} MB edgetl reads from an IDX file "
                                  "(corrupt header?)")
            data = f.read(n)
    except (OSError, EOFError, zlib.error) as e:
        raise EdgetlError(f"cannot read IDX file '{path}': {e}") from None
    if len(data) < n:
        raise EdgetlError(f"'{path}' is truncated: header says {shape}, file is too short")
    return np.frombuffer(data, np.uint8, n).reshape(shape)


def _idx_class_names(names: str) -> tuple:
    """Class names from a --names file, each usable as a folder name (one line per class)."""
    from edgetl.runner import printable

    p = Path(names)
    if not p.is_file():
        raise EdgetlError(f"--names '{names}': use fashion-mnist, mnist or a labels file")
    if p.stat().st_size > 1 << 20:
        raise EdgetlError(f"--names '{names}' is larger than 1 MB: give one class name a line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise EdgetlError(f"cannot read --names '{names}': {e}") from None
    class_names = tuple(line.strip().replace("/", "_") for line in lines if line.strip())
    for name in class_names:
        if name in (".", "..") or printable(name) != name or len(name.encode()) > 200:
            raise EdgetlError(f"--names '{names}': class name '{printable(name)}' cannot be a "
                              "folder name (it is '.' or '..', has control characters or is "
                              "over 200 bytes): fix that line")
    dup = next((n for i, n in enumerate(class_names) if n in class_names[:i]), None)
    if dup is not None:
        raise EdgetlError(f"--names '{names}': class name '{dup}' is given twice: each class "
                          "needs its own name")
    return class_names


def idx_to_folders(images: str, labels: str, out: str | os.PathLike, names: str = "fashion-mnist",
                   limit: int | None = None, overwrite: bool = False) -> dict:
    """Converts IDX images + labels into class folders of PNGs.

    Args:
        names: 'fashion-mnist', 'mnist', or a file with one class name per line.
        limit: at most this many images per class (the first ones in file order).

    Raises:
        EdgetlError: bad inputs, or ``out`` is (or holds) one of the inputs; nothing is left
            behind on any failure.
    """
    from PIL import Image

    out = Path(out)
    real_out = os.path.realpath(out)
    for flag, given in (("IMAGES", images), ("LABELS", labels), ("--names", names)):
        real = os.path.realpath(given)
        if os.path.exists(given) and (real == real_out or real.startswith(
                real_out.rstrip(os.sep) + os.sep)):  # --overwrite would delete it
            raise EdgetlError(f"OUT '{out}' {'is' if real == real_out else 'holds'} the "
                              f"{flag} file '{given}': choose another OUT folder")
    x, y = read_idx(images), read_idx(labels)
    if x.ndim == 1 and y.ndim == 3:
        raise EdgetlError(f"'{images}' holds labels and '{labels}' images: give the images file "
                          "first, then the labels file")
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        shapes = "x".join(map(str, x.shape)), "x".join(map(str, y.shape))
        raise EdgetlError(f"'{images}' (shape {shapes[0]}) and '{labels}' (shape {shapes[1]}) do "
                          "not match: need N images of HxW and N labels")
    if names == "fashion-mnist":
        class_names = FASHION_MNIST
    elif names == "mnist":
        class_names = MNIST
    else:
        class_names = _idx_class_names(names)
    if not class_names or (len(y) and int(y.max()) >= len(class_names)):
        raise EdgetlError(f"labels go up to {int(y.max()) if len(y) else 0} but only "
                          f"{len(class_names)} class names were given")
    if out.exists() and not out.is_dir():
        raise EdgetlError(f"'{out}' is a file, not a folder: choose another OUT folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EdgetlError(f"'{out}' exists and is not empty: choose another folder or pass "
                          "--overwrite")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp-idx")  # one per process
    counts: Counter = Counter()
    with _writing_folder(out, tmp):
        _rmtree(tmp)
        for name in class_names:
            (tmp / name).mkdir(parents=True)
        for i, (img, label) in enumerate(zip(x, y)):
            name = class_names[int(label)]
            if limit is not None and counts[name] >= limit:
                continue
            Image.fromarray(img).save(tmp / name / f"{i:05d}.png")
            counts[name] += 1
        _publish(tmp, out, overwrite)
    return dict(counts)


def _rmtree(path: Path) -> None:
    import shutil

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
