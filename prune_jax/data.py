"""Loads MNIST as numpy arrays from the four official IDX files, each checked against its SHA-256.

Where the files come from, first match wins:

1. the folder passed as `load_mnist(mnist_dir=...)` (the experiments pass their `--mnist_dir` flag);
2. the folder named by the environment variable `PRUNE_JAX_MNIST_DIR`;
3. tensorflow-datasets' download manager (`tfds.download.DownloadManager`, no TensorFlow needed), as
   tfds' own MNIST builder uses it: files a user placed in its manual dir
   `<data_dir>/downloads/manual`, else its download cache `<data_dir>/downloads/mnist`, else a download
   from the URLs tfds registers for MNIST, checked against the registered checksums. `<data_dir>` is
   `$TFDS_DATA_DIR`, default `~/tensorflow_datasets`.

A folder must hold the four files under their official names (`FILENAMES`). Whatever the source, every
file is checked against the official SHA-256 before it is parsed, so a corrupt, truncated or different
file raises `MnistFileError` instead of giving a wrong array. Without the files and without network,
`load_mnist` fails within seconds (a short probe of the download host precedes the download), with a
message saying where to put the files. The resolution, the probe and that message live in `_download`,
shared with the Tiny Shakespeare loader (`text_data.py`).
"""

import functools
import gzip
import os
import pathlib
import time
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from absl import logging

from prune_jax import _download

PathLike = _download.PathLike

ENV_VAR = "PRUNE_JAX_MNIST_DIR"
NUM_CLASSES = 10
IMAGE_SIDE = 28

# The URLs tfds' MNIST builder downloads (`tensorflow_datasets/image_classification/mnist.py`), so the
# checksums tfds registers for them (`tensorflow_datasets/url_checksums/mnist.txt`) apply, and the download
# cache is shared with `tfds.load("mnist")`.
_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
# How long the download host may take to answer before we give up (seconds, per connect and per read).
_PROBE_TIMEOUT_S = 5.0
# Asks whether the download host answers, before tfds would download (an attribute: tests replace it).
_probe = _download.probe


# The official files' SHA-256, as tfds registers them (also in the experiments' results, naming the data).
OFFICIAL_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}


class _FileSpec(NamedTuple):
  filename: str
  sha256: str
  size: int  # Bytes, as tfds registers it.
  shape: tuple[int, ...]


def _spec(filename: str, size: int, shape: tuple[int, ...]) -> _FileSpec:
  return _FileSpec(filename, OFFICIAL_SHA256[filename], size, shape)


# `MNIST` field -> its file.
_FILES = {
    "train_images": _spec("train-images-idx3-ubyte.gz", 9912422, (60000, IMAGE_SIDE, IMAGE_SIDE)),
    "train_labels": _spec("train-labels-idx1-ubyte.gz", 28881, (60000,)),
    "test_images": _spec("t10k-images-idx3-ubyte.gz", 1648877, (10000, IMAGE_SIDE, IMAGE_SIDE)),
    "test_labels": _spec("t10k-labels-idx1-ubyte.gz", 4542, (10000,)),
}
FILENAMES = tuple(spec.filename for spec in _FILES.values())

# IDX magic numbers: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions.
_IDX_UBYTE = 0x08
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension.
IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions.


class MNIST(NamedTuple):
  """MNIST as numpy arrays (read-only; copy before modifying in place).

  Attributes:
    train_images: float32 `[60000, 784]`, pixel / 255 in [0, 1]; each row is a 28x28 image, row-major.
    train_labels: int32 `[60000]`, digits 0-9.
    test_images: float32 `[10000, 784]`, as `train_images`.
    test_labels: int32 `[10000]`, digits 0-9.
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def on_device(mnist: MNIST) -> MNIST:
  """The same arrays on JAX's default device, put there once (`jax.device_put`).

  Trainings and evaluations then read them in place; given numpy arrays, every call would copy
  them to the device again (the training images are 188 MB).
  """
  return MNIST(*(jax.device_put(a) for a in mnist))


class MnistFileError(ValueError):
  """An MNIST file is corrupt, truncated or not the official file."""


class MnistDownloadError(OSError):
  """The MNIST files are not on this machine and could not be downloaded."""


def _source() -> _download.Source:
  """MNIST for `_download`; built at each call, so that tests may point `_MNIST_URL` elsewhere."""
  return _download.Source(
      title="MNIST",
      tfds_name="mnist",
      base_url=_MNIST_URL,
      files={name: _download.RemoteFile(spec.filename, spec.sha256, spec.size)
             for name, spec in _FILES.items()},
      function="load_mnist",
      argument="mnist_dir",
      flag="--mnist_dir",
      env_var=ENV_VAR,
      file_error=MnistFileError,
      download_error=MnistDownloadError,
  )


def load_mnist(mnist_dir: PathLike | None = None) -> MNIST:
  """Loads MNIST, from the first of these that is given (see the module docstring).

  `mnist_dir`, else `$PRUNE_JAX_MNIST_DIR`, else tfds' download manager (manual dir, download cache,
  download). A folder that is given must hold the four official files; there is no fallback from a given
  folder to a download.

  The arrays of the most recent call are cached in the process, keyed by the four files' resolved paths,
  sizes and modification times: another call with the same files returns the same read-only arrays at
  once (reading and checking the files takes about 0.7 s). A replaced file is read again.

  Args:
    mnist_dir: folder holding the four official files (`FILENAMES`), e.g. the `--mnist_dir` flag. `None`
      or `""` means not given.

  Returns:
    `MNIST(train_images, train_labels, test_images, test_labels)`: images float32 `[N, 784]` in [0, 1],
    labels int32 `[N]` in 0-9; N = 60000 for train, 10000 for test.

  Raises:
    FileNotFoundError: a given folder does not exist or lacks some of the files (all named).
    MnistFileError: a file fails its SHA-256 check or is not a valid MNIST IDX file.
    MnistDownloadError: no folder given, the files are in neither tfds' manual dir nor its cache, and the
      download host does not answer (offline) or the download fails.
  """
  paths = _download.resolve(_source(), mnist_dir, probe=_probe, timeout=_PROBE_TIMEOUT_S)
  key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in (paths[name] for name in _FILES))
  return _load_files(key)


def read_idx(path: PathLike, *, shape: Sequence[int] | None = None, sha256: str | None = None) -> np.ndarray:
  """Reads a gzipped IDX file of unsigned bytes (the MNIST format) into a uint8 array.

  IDX layout: a big-endian 4-byte magic (0, 0, 0x08 for unsigned bytes, the number of dimensions: 2049
  for labels, 2051 for images), one big-endian uint32 per dimension, then the data, row-major.

  Args:
    path: the `.gz` file.
    shape: the expected shape, e.g. `(60000, 28, 28)`; it also fixes the expected magic number
      (`2048 + len(shape)`). `None` accepts any shape.
    sha256: the expected hex SHA-256 of the file as stored (the gzipped bytes), checked before parsing.

  Returns:
    uint8 array of the shape in the header.

  Raises:
    FileNotFoundError: `path` does not exist.
    MnistFileError: wrong checksum, not gzip or truncated gzip, wrong magic number, header shape not
      `shape`, or more or fewer data bytes than the header says. The message names the file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"IDX file {path} does not exist.")
  stored = path.read_bytes()
  if sha256 is not None:
    _download.check_sha256(path, stored, sha256, error=MnistFileError)
  try:
    raw = gzip.decompress(stored)
  except (OSError, EOFError, zlib.error) as e:
    raise MnistFileError(f"{path} is not a complete gzip file ({e}); delete it and re-download it.") from e
  if len(raw) < 4:
    raise MnistFileError(f"{path}: {len(raw)} bytes after gunzip, too short for an IDX header.")
  zero0, zero1, dtype, ndim = raw[:4]
  magic = int.from_bytes(raw[:4], "big")
  expected_magic = None if shape is None else (_IDX_UBYTE << 8) + len(shape)
  if zero0 or zero1 or dtype != _IDX_UBYTE or ndim == 0 or (expected_magic is not None and magic != expected_magic):
    want = f"{expected_magic} (0x{expected_magic:08x})" if expected_magic else "0x000008nn (unsigned bytes, nn dims)"
    raise MnistFileError(f"{path}: IDX magic number {magic} (0x{magic:08x}), expected {want}; not an MNIST file?")
  header_len = 4 + 4 * ndim
  if len(raw) < header_len:
    raise MnistFileError(f"{path}: truncated IDX header ({len(raw)} bytes, {header_len} needed).")
  dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
  if shape is not None and dims != tuple(shape):
    raise MnistFileError(f"{path}: IDX header says shape {dims}, expected {tuple(shape)}.")
  expected_len = header_len + int(np.prod(dims))
  if len(raw) != expected_len:
    how = "truncated" if len(raw) < expected_len else "has trailing bytes"
    raise MnistFileError(
        f"{path}: {how}: {len(raw) - header_len} data bytes, but the IDX header {dims} needs "
        f"{expected_len - header_len}. Delete it and re-download it."
    )
  return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


@functools.lru_cache(maxsize=1)
def _load_files(key: tuple[tuple[str, int, int], ...]) -> MNIST:
  """Reads, checks and converts the four files `key` names (path, size, mtime), in `_FILES` order."""
  start = time.perf_counter()
  arrays = {}
  for (path, _, _), (name, spec) in zip(key, _FILES.items(), strict=True):
    raw = read_idx(path, shape=spec.shape, sha256=spec.sha256)
    if name.endswith("labels"):
      if raw.max() >= NUM_CLASSES:
        raise MnistFileError(f"{path}: label {int(raw.max())} out of range 0-{NUM_CLASSES - 1}.")
      array = raw.astype(np.int32)
    else:
      array = np.divide(raw.reshape(raw.shape[0], -1), np.float32(255), dtype=np.float32)
    array.setflags(write=False)
    arrays[name] = array
  logging.info("Loaded MNIST from %s in %.2f s.", os.path.dirname(key[0][0]), time.perf_counter() - start)
  return MNIST(**arrays)
