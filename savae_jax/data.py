"""Datasets as arrays, and epochs of batches driven by JAX keys.

`load(name, split, data_dir)` returns a `Dataset` of float32 images in [0, 1]
with shape (N, H, W, C) and int32 labels. Sources, in order of preference:

* ``digits``: scikit-learn's 8x8 digits, embedded in that package (offline).
* ``mnist`` / ``fashion_mnist``: raw IDX files (``train-images-idx3-ubyte[.gz]``
  and friends) from ``data_dir`` or ``$SAVAE_DATA_DIR`` when present.
* ``mnist``, ``fashion_mnist``, ``binarized_mnist``, ``cifar10``: TensorFlow
  Datasets via ``tfds.data_source`` (array_record; TensorFlow not needed).

Batching is split into a jittable core (`epoch_indices`, `make_batch`) for
compiled training loops, and a notebook-friendly generator (`batches`).
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from savae_jax import rng

DATASETS = ("digits", "mnist", "fashion_mnist", "binarized_mnist", "cifar10")
BINARIZE = (None, "dynamic", "static")
SPLITS = ("train", "test")

ENV_DATA_DIR = "SAVAE_DATA_DIR"

# Datasets that may be served from raw MNIST-format IDX files.
_IDX_DATASETS = ("mnist", "fashion_mnist")
# File stems per split; both the plain and the ".gz" form are accepted.
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_MAGIC_IMAGES = 0x00000803  # unsigned byte, 3 dims (N, rows, cols)
_IDX_MAGIC_LABELS = 0x00000801  # unsigned byte, 1 dim (N,)

# Digits: sklearn's order is fixed, so a prefix split is stable and needs no RNG.
_DIGITS_NUM_TRAIN = 1500

# Records read per `__getitems__` call: big enough to amortise per-call
# overhead, small enough that one chunk of decoded dicts stays cheap.
_TFDS_CHUNK = 4096


class Dataset(NamedTuple):
    """Images and labels of one split, held as host numpy arrays.

    Attributes:
      images: float32 in [0, 1], shape (N, H, W, C).
      labels: int32, shape (N,); -1 where the dataset has no labels.
      name: dataset name, e.g. "digits".
    """

    images: np.ndarray
    labels: np.ndarray
    name: str

    def __repr__(self) -> str:
        # The default NamedTuple repr would print every pixel in a notebook.
        return (
            f"Dataset(name={self.name!r}, "
            f"images={self.images.dtype}{tuple(self.images.shape)}, "
            f"labels={self.labels.dtype}{tuple(self.labels.shape)})"
        )


class DataNotFoundError(FileNotFoundError):
    """Raised by `load` when a dataset is neither on disk as IDX nor in TFDS."""


# ---------------------------------------------------------------------------
# Validation and construction
# ---------------------------------------------------------------------------


def validate_images(images, name: str = "images") -> None:
    """Check that `images` is a non-empty float (N, H, W, C) array in [0, 1].

    Args:
      images: numpy or JAX array.
      name: how the array is called in error messages.

    Raises:
      ValueError: naming `name`, on wrong rank, non-float dtype, N == 0,
        NaN/inf, or values outside [0, 1].
    """
    if isinstance(images, jax.Array) and np.issubdtype(images.dtype, np.floating) and images.ndim == 4:
        # On the device: reduce there and fetch three numbers, not the whole array.
        arr = images
    else:
        arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(
            f"{name} must be 4-D (N, H, W, C), got shape {arr.shape} "
            f"({arr.ndim}-D); add a channel axis with x[..., None] for grayscale."
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (N == 0), shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.floating):
        # uint8 pixels are the usual cause; silently accepting them would
        # train on values in [0, 255].
        raise ValueError(
            f"{name} must be a float array with values in [0, 1], got dtype "
            f"{arr.dtype}; divide 8-bit images by 255."
        )
    xp = jnp if isinstance(arr, jax.Array) else np
    if not bool(xp.all(xp.isfinite(arr))):
        raise ValueError(f"{name} contains NaN or inf values.")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} must have values in [0, 1], got range [{lo}, {hi}].")


def as_images(data, name: str = "images") -> jax.Array:
    """The images of a ``Dataset`` or an (N, H, W, C) array, validated, as a float32 device array.

    The one check of every function that takes images (``fit``, ``evaluate``,
    ``evaluate_iwae``, ``diagnostics``, ``report``): see :func:`validate_images`.

    Args:
      data: a :class:`Dataset` or an array in [0, 1].
      name: the argument, as errors name it.
    """
    if isinstance(data, (tuple, list, dict)) and not isinstance(data, Dataset):
        hint = (" (data.split_validation returns (train, validation): pass its second item)"
                if isinstance(data, tuple) and len(data) == 2 else "")
        raise ValueError(f"{name} must be a Dataset or an (N, H, W, C) array in [0, 1], "
                         f"got a {type(data).__name__} of {len(data)}{hint}")
    images = data.images if isinstance(data, Dataset) else data
    validate_images(images, name=name)
    return jnp.asarray(images, jnp.float32)


def make_dataset(images, labels=None, name: str = "custom") -> Dataset:
    """Validate and cast arrays into a `Dataset`.

    Args:
      images: float array (N, H, W, C) with values in [0, 1].
      labels: integer array (N,), or None for an unlabeled set (all -1).
      name: dataset name stored on the result.

    Returns:
      Dataset with float32 images and int32 labels.

    Raises:
      ValueError: as `validate_images`, or naming 'labels' when labels are not
        a 1-D integer array with one entry per image.
    """
    validate_images(images, "images")
    images = np.asarray(images, dtype=np.float32)
    n = images.shape[0]
    if labels is None:
        labels = np.full((n,), -1, dtype=np.int32)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {labels.shape}.")
    if labels.shape[0] != n:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but images has {n} examples."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
    return Dataset(images=images, labels=labels.astype(np.int32), name=name)


def split_validation(data: Dataset, size, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Hold out a validation split of the training data: ``(train, validation)``.

    The held-out examples are a random subset drawn by a permutation of
    ``jax.random.key(seed)``, so the split is a pure function of ``seed``;
    both parts keep the original order of their examples. Model selection
    (the driver's validation gate, early stopping, hyperparameter choice)
    reads this split, never the test set.

    Args:
      data: the training ``Dataset``, or its images (an (N, H, W, C) array
        in [0, 1]; both parts are then Datasets without labels).
      size: examples to hold out: a float fraction in (0, 1) or an integer
        count; at least one example must remain on each side.
      seed: seed of the permutation.
    """
    if not isinstance(data, Dataset):
        data = make_dataset(as_images(data, "data"), None, "data")
    n = data.images.shape[0]
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise ValueError(f"validation size must be a fraction in (0, 1) or a count >= 1, got {size!r}")
    is_count = isinstance(size, (int, np.integer))
    count = size if is_count else round(size * n) if 0 < size < 1 else 0
    if not 1 <= count <= n - 1:
        raise ValueError(f"validation size must be a fraction in (0, 1) or an integer count in [1, {n - 1}] "
                         f"(the training set has {n} examples), got {size!r}")
    held = np.zeros(n, bool)
    held[np.asarray(jax.random.permutation(jax.random.key(seed), n))[: int(count)]] = True
    return (Dataset(data.images[~held], data.labels[~held], data.name),
            Dataset(data.images[held], data.labels[held], f"{data.name} (validation)"))


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load(name: str, split: str = "train", data_dir: str | None = None) -> Dataset:
    """Load one split of a dataset as float32 images in [0, 1].

    ``digits``: sklearn's 1797 8x8 digits (values 0..16, divided by 16). Fixed
    split in sklearn's own order: the first 1500 examples are "train", the last
    297 are "test". No randomness, so the split is the same on every machine.

    ``mnist`` / ``fashion_mnist``: if raw IDX files for the split
    (``train-images-idx3-ubyte[.gz]`` + ``train-labels-idx1-ubyte[.gz]``, or
    ``t10k-*`` for "test") are found, they are read in place. Looked for in
    ``data_dir/<name>/`` then ``data_dir/``; when ``data_dir`` is None, in
    ``$SAVAE_DATA_DIR/<name>/`` and, for "mnist" only, ``$SAVAE_DATA_DIR/``
    itself (so an MNIST directory in the variable is never mistaken for
    Fashion-MNIST). Relative paths are resolved against the working directory.

    Otherwise (and always for ``binarized_mnist``, ``cifar10``) the dataset is
    read with ``tfds.data_source(name, split, data_dir=data_dir,
    download=False)``; ``data_dir=None`` means TFDS's default
    (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Nothing is downloaded.
    ``binarized_mnist`` has no labels: they are all -1. It also has a
    "validation" split.

    Args:
      name: one of `DATASETS`.
      split: "train" or "test" ("validation" too for binarized_mnist).
      data_dir: directory with IDX files and/or prepared TFDS datasets.

    Returns:
      Dataset with images (N, H, W, C) float32 and labels (N,) int32.

    Raises:
      ValueError: naming 'name' or 'split' for unknown values; naming the file
        for corrupt IDX files.
      DataNotFoundError: (a FileNotFoundError) when the data is not available;
        the message says where it looked and how to provide the data.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset name {name!r}; expected one of {DATASETS}.")
    allowed = SPLITS + (("validation",) if name == "binarized_mnist" else ())
    if split not in allowed:
        raise ValueError(f"Unknown split {split!r} for {name!r}; expected one of {allowed}.")

    if name == "digits":
        return _load_digits(split)

    idx_dirs = _idx_candidate_dirs(name, data_dir) if name in _IDX_DATASETS else []
    for d in idx_dirs:
        paths = _find_idx_files(d, split)
        if paths is not None:
            return _load_idx(name, *paths)
    return _load_tfds(name, split, data_dir, idx_dirs)


def _load_digits(split: str) -> Dataset:
    """Load sklearn's digits and cut the fixed 1500/297 train/test split."""
    from sklearn.datasets import load_digits  # deferred: sklearn import is slow

    raw = load_digits()
    images = (raw.images / 16.0).astype(np.float32)[..., None]
    labels = raw.target.astype(np.int32)
    sl = slice(None, _DIGITS_NUM_TRAIN) if split == "train" else slice(_DIGITS_NUM_TRAIN, None)
    return make_dataset(images[sl], labels[sl], name="digits")


def _resolve_dir(path) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def _idx_candidate_dirs(name: str, data_dir) -> list[str]:
    """Directories to search for IDX files, most specific first."""
    if data_dir is not None:
        root = _resolve_dir(data_dir)
        return [os.path.join(root, name), root]
    env = os.environ.get(ENV_DATA_DIR)
    if not env:
        return []
    root = _resolve_dir(env)
    return [os.path.join(root, name)] + ([root] if name == "mnist" else [])


def _find_idx_files(directory: str, split: str) -> tuple[str, str] | None:
    """Paths of (images, labels) IDX files for `split`, or None if incomplete."""
    found = []
    for stem in _IDX_FILES[split]:
        for candidate in (stem, stem + ".gz"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                found.append(path)
                break
        else:
            return None
    return found[0], found[1]


def read_idx(path) -> np.ndarray:
    """Read an MNIST-format IDX file (optionally gzipped) into a uint8 array.

    The header is a big-endian magic number ``0x0000 08 D`` (unsigned bytes,
    D dimensions), then D big-endian uint32 sizes, then the payload. Supported
    magic numbers: 0x00000803 (images, N x rows x cols) and 0x00000801
    (labels, N).

    Args:
      path: file path; a ``.gz`` suffix means gzip-compressed.

    Returns:
      uint8 array with the shape given by the header.

    Raises:
      ValueError: naming the file for a bad magic number, a truncated header or
        payload, trailing bytes, or an unreadable gzip stream.
    """
    path = os.fspath(path)
    fname = os.path.basename(path)
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        # gzip raises BadGzipFile/EOFError on corrupt or cut-off streams.
        raise ValueError(f"IDX file {fname} ({path}) could not be read: {e}") from e

    if len(raw) < 4:
        raise ValueError(f"IDX file {fname} is truncated: {len(raw)} bytes, no header.")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic not in (_IDX_MAGIC_IMAGES, _IDX_MAGIC_LABELS):
        raise ValueError(
            f"IDX file {fname} has bad magic number 0x{magic:08x}; expected "
            f"0x{_IDX_MAGIC_IMAGES:08x} (images) or 0x{_IDX_MAGIC_LABELS:08x} (labels)."
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {fname} is truncated inside its {ndim}-D header.")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - header
    if payload < expected:
        raise ValueError(
            f"IDX file {fname} is truncated: header dims {dims} need {expected} "
            f"bytes of data, found {payload}."
        )
    if payload > expected:
        raise ValueError(
            f"IDX file {fname} has {payload - expected} bytes beyond what its "
            f"header dims {dims} describe (count mismatch)."
        )
    # frombuffer is a zero-copy view; copy so the result is writeable and owns
    # its memory rather than pinning the decompressed bytes object.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _load_idx(name: str, images_path: str, labels_path: str) -> Dataset:
    """Read an images/labels IDX pair into a Dataset."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    img_file, lbl_file = os.path.basename(images_path), os.path.basename(labels_path)
    if images.ndim != 3:
        raise ValueError(f"IDX file {img_file} holds labels (shape {images.shape}), not images.")
    if labels.ndim != 1:
        raise ValueError(f"IDX file {lbl_file} holds images (shape {labels.shape}), not labels.")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"IDX files {img_file} and {lbl_file} disagree: {images.shape[0]} images "
            f"but {labels.shape[0]} labels."
        )
    x = (images.astype(np.float32) / 255.0)[..., None]
    return make_dataset(x, labels.astype(np.int32), name=name)


def _tfds_default_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _missing_data_message(name, split, data_dir, idx_dirs, cause) -> str:
    if name in _IDX_DATASETS:
        looked_idx = (
            ", ".join(idx_dirs)
            if idx_dirs
            else f"(none: data_dir=None and ${ENV_DATA_DIR} is not set)"
        )
        idx_line = f"  IDX files ({'/'.join(_IDX_FILES[split])}[.gz]) in: {looked_idx}\n"
        idx_fix = (
            f"  1. Put the MNIST-format IDX files ({', '.join(s + '.gz' for s in _IDX_FILES[split])}) "
            f"in a directory and pass data_dir=... or set ${ENV_DATA_DIR}.\n"
        )
    else:
        idx_line = f"  IDX files: not applicable ({name} is only read through TFDS)\n"
        idx_fix = f"  1. (IDX files only serve {_IDX_DATASETS}.)\n"
    tfds_dir = _resolve_dir(data_dir) if data_dir is not None else _tfds_default_dir()
    return (
        f"Dataset {name!r} split {split!r} not found.\nLooked for:\n"
        f"{idx_line}"
        f"  a prepared TFDS dataset (array_record) in: {tfds_dir}\n"
        f"To provide it:\n"
        f"{idx_fix}"
        f"  2. Prepare the TFDS dataset on a machine with network, e.g. "
        f"`tfds build {name} --file_format=array_record --data_dir=DIR`, and copy DIR "
        f"here; pass data_dir=DIR (default ~/tensorflow_datasets or $TFDS_DATA_DIR).\n"
        f"TFDS said: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    )


def _load_tfds(name: str, split: str, data_dir, idx_dirs) -> Dataset:
    """Read a split through `tfds.data_source` and stack it into arrays."""
    try:
        import tensorflow_datasets as tfds  # deferred: heavy import, optional path

        source = tfds.data_source(
            name,
            split=split,
            data_dir=None if data_dir is None else _resolve_dir(data_dir),
            download=False,
            try_gcs=False,
        )
    except Exception as e:  # noqa: BLE001 - TFDS raises many types for "absent"
        # Missing data surfaces as DatasetNotFoundError, FileNotFoundError, or
        # even NotImplementedError ("FileFormat.TFRECORD is not supported")
        # depending on what is on disk; users need one actionable message.
        raise DataNotFoundError(
            _missing_data_message(name, split, data_dir, idx_dirs, e)
        ) from e
    return _stack_records(source, name)


def _stack_records(source, name: str) -> Dataset:
    """Stack a random-access source of {"image", "label"?} dicts into a Dataset."""
    n = len(source)
    if n == 0:
        raise ValueError(f"TFDS split of {name!r} is empty.")
    images = None
    labels = np.full((n,), -1, dtype=np.int32)
    for start in range(0, n, _TFDS_CHUNK):
        keys = list(range(start, min(start + _TFDS_CHUNK, n)))
        # One batched read per chunk instead of one per record: array_record
        # reads a chunk in parallel and we skip per-item Python dispatch.
        records = source.__getitems__(keys)
        chunk = np.stack([np.asarray(r["image"]) for r in records])
        if images is None:
            # Preallocate once the image shape is known: avoids holding both
            # a list of uint8 chunks and the stacked copy.
            images = np.empty((n,) + chunk.shape[1:], dtype=chunk.dtype)
        images[start : start + len(keys)] = chunk
        if "label" in records[0]:
            labels[start : start + len(keys)] = [int(r["label"]) for r in records]
    if images.ndim == 3:
        images = images[..., None]
    if name == "binarized_mnist":
        # Stored as {0, 1}; mapping nonzero -> 1 also accepts a 0/255 encoding.
        x = (images > 0).astype(np.float32)
    else:
        x = images.astype(np.float32) / 255.0
    return make_dataset(x, labels, name=name)


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Number of batches in one epoch.

    Args:
      num_examples: N, the number of examples.
      batch_size: B, examples per batch.
      drop_remainder: if True, floor(N / B); else ceil(N / B).

    Returns:
      The number of batches.

    Raises:
      ValueError: naming 'batch_size' if B <= 0, or if drop_remainder and
        B > N (the epoch would be empty).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}.")
    if drop_remainder:
        if batch_size > num_examples:
            raise ValueError(
                f"batch_size {batch_size} exceeds num_examples {num_examples} with "
                f"drop_remainder=True: the epoch would have no batches."
            )
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def epoch_indices(key, num_examples: int, batch_size: int, drop_remainder: bool = True) -> jax.Array:
    """Shuffled example indices for one epoch, one row per batch.

    A permutation ``jax.random.permutation(key, N)`` reshaped to
    (num_batches, B). Jittable with `num_examples`, `batch_size`,
    `drop_remainder` static. With drop_remainder=True the last N mod B
    permuted indices are dropped. With drop_remainder=False the last row holds
    the N - (num_batches - 1) * B remaining indices first, padded with indices
    from the start of the permutation (valid indices, so gathering stays safe
    under jit); `batches` trims the padding.

    Args:
      key: JAX PRNG key.
      num_examples: N.
      batch_size: B.
      drop_remainder: see `num_batches`.

    Returns:
      int32 array (num_batches, B).
    """
    nb = num_batches(num_examples, batch_size, drop_remainder)
    perm = jax.random.permutation(key, num_examples).astype(jnp.int32)
    total = nb * batch_size
    if total > num_examples:
        perm = jnp.concatenate([perm, perm[: total - num_examples]])
    return perm[:total].reshape(nb, batch_size)


def _check_binarize(binarize) -> None:
    if not any(binarize is b or (isinstance(binarize, str) and binarize == b) for b in BINARIZE):
        raise ValueError(f"binarize must be one of {BINARIZE}, got {binarize!r}.")


def _bernoulli(key, probs) -> jax.Array:
    return rng.bernoulli(key, probs).astype(jnp.float32)


def binarize(key, images) -> jax.Array:
    """Sample binary images, each pixel ~ Bernoulli(pixel intensity).

    Args:
      key: JAX PRNG key.
      images: float array with values in [0, 1].

    Returns:
      float32 array of the same shape with values in {0, 1}.
    """
    return _bernoulli(key, jnp.asarray(images, dtype=jnp.float32))


def _binarize_batch(x, idx, key, binarize, static_seed: int) -> jax.Array:
    """Apply the binarization mode to a gathered batch `x` = images[idx]."""
    if binarize is None:
        return x
    if binarize == "dynamic":
        if key is None:
            raise ValueError("key is required for binarize='dynamic'.")
        return _bernoulli(key, x)
    # "static": noise is a function of (static_seed, example index) only, so
    # every epoch and every batch order sees the same binary image.
    base = jax.random.key(static_seed)

    def one(i, p):
        u = rng.flat_draw(jax.random.uniform, jax.random.fold_in(base, i), p.shape, dtype=jnp.float32)
        return (u < p).astype(jnp.float32)

    return jax.vmap(one)(idx, x)


def make_batch(images, idx, key=None, binarize=None, static_seed: int = 0) -> jax.Array:
    """Gather one batch and optionally binarize it. Pure and jittable.

    `binarize` and `static_seed` are static Python values (mark them static
    under `jax.jit`).

    Args:
      images: array (N, H, W, C) with values in [0, 1].
      idx: int32 (B,) example indices.
      key: PRNG key; required for binarize="dynamic", ignored otherwise.
      binarize: None (return images[idx]), "dynamic" (fresh Bernoulli sample
        from `key`), or "static" (a fixed sample per example:
        ``uniform(fold_in(key(static_seed), i)) < images[i]``).
      static_seed: seed of the static binarization.

    Returns:
      float32 array (B, H, W, C).

    Raises:
      ValueError: naming 'binarize' for an unknown mode, or 'key' when
        binarize="dynamic" and key is None.
    """
    _check_binarize(binarize)
    idx = jnp.asarray(idx)
    x = jnp.asarray(images, dtype=jnp.float32)[idx]
    return _binarize_batch(x, idx, key, binarize, static_seed)


class BatchFn(NamedTuple):
    """The per-step batch function, built once: gather a batch and binarise it from a key.

    ``batch_fn(images, idx, key)`` is ``make_batch(images, idx, key,
    binarize, static_seed)``. A NamedTuple of static values, so it is
    hashable (a static argument under ``jax.jit``) and one object carries the
    binarisation to the training driver and the evaluations alike.

    Attributes:
      binarize: None, "dynamic" or "static" (see ``make_batch``).
      static_seed: seed of the "static" binarisation.
    """

    binarize: str | None = None
    static_seed: int = 0

    def __call__(self, images, idx, key=None) -> jax.Array:
        return make_batch(images, idx, key, self.binarize, self.static_seed)

    def validate(self) -> "BatchFn":
        """This BatchFn, after checking ``binarize`` (ValueError naming it)."""
        _check_binarize(self.binarize)
        return self


def as_batch_fn(binarize=None, static_seed: int = 0) -> BatchFn:
    """``binarize`` as a :class:`BatchFn`: a BatchFn is returned as it is, a mode is wrapped.

    Lets the public functions that take ``binarize`` (``fit``, the
    evaluations) accept the run's one ``BatchFn`` as well as a mode name.
    ValueError naming ``binarize`` for an unknown mode.
    """
    if isinstance(binarize, BatchFn):
        return binarize.validate()
    return BatchFn(binarize, static_seed).validate()


_binarize_batch_jit = jax.jit(_binarize_batch, static_argnames=("binarize", "static_seed"))


def batches(
    key,
    data: Dataset,
    batch_size: int,
    binarize=None,
    drop_remainder: bool = True,
    static_seed: int = 0,
) -> Iterator[jax.Array]:
    """Yield the batches of one shuffled epoch (for notebooks and scripts).

    Same batches as `epoch_indices` + `make_batch`, but gathers on the host so
    the whole dataset is never copied to the device. For "dynamic"
    binarization each batch gets its own subkey.

    Args:
      key: PRNG key; determines the order and the dynamic binarization.
      data: Dataset to iterate over.
      batch_size: examples per batch.
      binarize: None, "dynamic" or "static" (see `make_batch`).
      drop_remainder: if False, the last short batch is yielded too.
      static_seed: seed of the static binarization.

    Yields:
      float32 arrays (B, H, W, C); the last may be shorter if not drop_remainder.
    """
    _check_binarize(binarize)
    n = data.images.shape[0]
    key_perm, key_bin = jax.random.split(key)
    idx = np.asarray(epoch_indices(key_perm, n, batch_size, drop_remainder))
    nb = idx.shape[0]
    bin_keys = jax.random.split(key_bin, nb)
    last = n - (nb - 1) * batch_size  # == batch_size when nothing is left over
    for b in range(nb):
        rows = idx[b] if (drop_remainder or b < nb - 1) else idx[b, :last]
        x = jnp.asarray(data.images[rows], dtype=jnp.float32)
        if binarize is None:
            yield x
        else:
            yield _binarize_batch_jit(x, jnp.asarray(rows), bin_keys[b], binarize, static_seed)
