"""Loads Tiny Shakespeare at character level, as nanoGPT's `data/shakespeare_char/prepare.py` does.

The text is karpathy/char-rnn's `data/tinyshakespeare/input.txt` (1,115,394 characters), checked
against its SHA-256 before use. Where it comes from, first match wins (as MNIST in `data.py`, through
the same code, `_download`):

1. the folder passed as `load_shakespeare(data_dir=...)` (the experiments pass `--shakespeare_dir`);
2. the folder named by the environment variable `PRUNE_JAX_SHAKESPEARE_DIR`;
3. tensorflow-datasets' download manager (no TensorFlow needed), with the URL and checksum tfds
   registers for `tiny_shakespeare`: the file a user placed in its manual dir
   `<data_dir>/downloads/manual/input.txt`, else its download cache
   `<data_dir>/downloads/tiny_shakespeare`, else a download. `<data_dir>` is `$TFDS_DATA_DIR`, default
   `~/tensorflow_datasets`. Offline, this fails within seconds, saying where to put the file.

The vocabulary is the sorted distinct characters (65); token ids index it. The first
`int(0.9 * len(text))` characters are the training split, the rest the validation split.
`validation_windows` cuts a fixed set of windows from the validation split (the same for every method
that is compared); `sample_windows` draws random training or calibration windows, jittable.
"""

import functools
import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from prune_jax import _download

PathLike = _download.PathLike

ENV_VAR = "PRUNE_JAX_SHAKESPEARE_DIR"
FILENAME = "input.txt"
# The URL, size and SHA-256 tfds registers for `tiny_shakespeare`: the builder
# `tensorflow_datasets/datasets/tiny_shakespeare/tiny_shakespeare_dataset_builder.py`
# (`dl_manager.download('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/
# input.txt')`) and its `tensorflow_datasets/datasets/tiny_shakespeare/checksums.tsv` (URL, size,
# checksum, filename). With them, the download cache is shared with `tfds.load("tiny_shakespeare")`.
_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
OFFICIAL_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SIZE = 1_115_394  # Bytes, as tfds registers it; the text is ASCII, so also its number of characters.
TRAIN_FRACTION = 0.9  # The training split: the first `int(TRAIN_FRACTION * len(text))` characters.
# How long the download host may take to answer before we give up (seconds, per connect and per read).
_PROBE_TIMEOUT_S = 5.0
# Asks whether the download host answers, before tfds would download (an attribute: tests replace it).
_probe = _download.probe


class ShakespeareFileError(ValueError):
  """The Tiny Shakespeare file is corrupt, truncated or not the official file."""


class ShakespeareDownloadError(OSError):
  """The Tiny Shakespeare file is not on this machine and could not be downloaded."""


class CharCorpus(NamedTuple):
  """A character-level corpus: its vocabulary and its two splits as token ids (read-only arrays).

  Attributes:
    vocab: the sorted distinct characters of the whole text; token id `i` is the character `vocab[i]`
      (65 characters for Tiny Shakespeare: newline, space, `!$&',-.3:;?`, A-Z, a-z).
    train: int32 `[int(0.9 * n)]`, the ids of the first 90% of the text's n characters.
    val: int32 `[n - int(0.9 * n)]`, the ids of the rest.
  """

  vocab: str
  train: np.ndarray
  val: np.ndarray

  @property
  def vocab_size(self) -> int:
    """The number of distinct characters, `len(vocab)`: the models' number of classes."""
    return len(self.vocab)

  def encode(self, text: str) -> np.ndarray:
    """The token ids of `text`: int32 `[len(text)]`, `ids[i] = vocab.index(text[i])`.

    Raises:
      ValueError: `text` holds characters outside `vocab` (named, with the first one's position).
    """
    return encode(self.vocab, text)

  def decode(self, ids) -> str:
    """The text of the token ids `ids` (integers in `[0, len(vocab))`, shape `[n]` or scalar).

    Raises:
      TypeError: `ids` are not integers.
      ValueError: `ids` is not 1-D, or holds ids outside `[0, len(vocab))` (the first one named).
    """
    return decode(self.vocab, ids)


def _code_points(text: str) -> np.ndarray:
  """uint32 `[len(text)]`: the Unicode code point of each character."""
  return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


@functools.lru_cache(maxsize=8)
def _id_of_code_point(vocab: str) -> np.ndarray:
  """int32 `[max code point + 1]`: the id of each code point in `vocab`, -1 for the others."""
  codes = _code_points(vocab)
  table = np.full(int(codes.max()) + 1 if codes.size else 0, -1, dtype=np.int32)
  table[codes] = np.arange(codes.size, dtype=np.int32)
  table.setflags(write=False)
  return table


def encode(vocab: str, text: str) -> np.ndarray:
  """The ids of `text`'s characters in `vocab`: int32 `[len(text)]` (see `CharCorpus.encode`)."""
  if not isinstance(text, str):
    raise TypeError(f"encode takes a str, got {type(text).__name__}; decode bytes first.")
  codes = _code_points(text)
  table = _id_of_code_point(vocab)
  ids = np.full(codes.shape, -1, dtype=np.int32)
  known = codes < table.size
  ids[known] = table[codes[known]]
  unknown = np.flatnonzero(ids < 0)
  if unknown.size:
    chars = sorted(set(text[i] for i in unknown))
    shown = ", ".join(repr(c) for c in chars[:10]) + (", ..." if len(chars) > 10 else "")
    raise ValueError(
        f"{len(chars)} character(s) not in the vocabulary of {len(vocab)} characters {vocab!r}: {shown} "
        f"(the first at position {unknown[0]}). Encode only text made of the vocabulary's characters: "
        f"replace or drop the others first."
    )
  return ids


def decode(vocab: str, ids) -> str:
  """The text of the ids `ids` in `vocab` (see `CharCorpus.decode`)."""
  ids = np.asarray(ids)
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"token ids must be integers, got dtype {ids.dtype}.")
  if ids.ndim > 1:
    raise ValueError(f"decode takes ids of shape [n], got shape {ids.shape}; decode one row at a time.")
  ids = ids.reshape(-1)
  bad = np.flatnonzero((ids < 0) | (ids >= len(vocab)))
  if bad.size:
    raise ValueError(
        f"token id {int(ids[bad[0]])} at position {bad[0]} is outside the vocabulary's ids "
        f"[0, {len(vocab)}) ({bad.size} such ids in all); ids must come from the same corpus' encode."
    )
  return _code_points(vocab)[ids].astype("<u4").tobytes().decode("utf-32-le")


def char_corpus(text: str) -> CharCorpus:
  """The character-level corpus of `text`, as nanoGPT's `data/shakespeare_char/prepare.py` makes it.

  Args:
    text: the whole text.

  Returns:
    `CharCorpus(vocab, train, val)`: `vocab = "".join(sorted(set(text)))`; `train` the ids of
    `text[:int(0.9 * len(text))]`, `val` those of the rest; read-only int32 arrays.

  Raises:
    ValueError: `text` is empty.
  """
  if not text:
    raise ValueError("char_corpus needs a non-empty text.")
  unique, ids = np.unique(_code_points(text), return_inverse=True)  # Sorted by code point, as `sorted`.
  ids = ids.astype(np.int32).reshape(-1)
  ids.setflags(write=False)  # The splits, views of `ids`, are read-only too.
  vocab = unique.astype("<u4").tobytes().decode("utf-32-le")
  split = int(TRAIN_FRACTION * len(text))
  return CharCorpus(vocab=vocab, train=ids[:split], val=ids[split:])


def _source() -> _download.Source:
  """Tiny Shakespeare for `_download`; built at each call, so that tests may point `_SHAKESPEARE_URL`
  elsewhere."""
  return _download.Source(
      title="Tiny Shakespeare",
      tfds_name="tiny_shakespeare",
      base_url=_SHAKESPEARE_URL,
      files={"text": _download.RemoteFile(FILENAME, OFFICIAL_SHA256, SIZE)},
      function="load_shakespeare",
      argument="data_dir",
      flag="--shakespeare_dir",
      env_var=ENV_VAR,
      file_error=ShakespeareFileError,
      download_error=ShakespeareDownloadError,
  )


def load_shakespeare(data_dir: PathLike | None = None) -> CharCorpus:
  """Loads Tiny Shakespeare, from the first of these that is given (see the module docstring).

  `data_dir`, else `$PRUNE_JAX_SHAKESPEARE_DIR`, else tfds' download manager (manual dir, download
  cache, download). A folder that is given must hold `input.txt`; there is no fallback from a given
  folder to a download. The file is checked against its SHA-256 (`OFFICIAL_SHA256`) before use.

  The corpus of the most recent call is cached in the process, keyed by the file's resolved path, size
  and modification time: another call with the same file returns the same corpus (the same read-only
  arrays) at once. A replaced file is read again.

  Args:
    data_dir: folder holding `input.txt`, e.g. the `--shakespeare_dir` flag. `None` or `""` means not
      given.

  Returns:
    `CharCorpus(vocab, train, val)`: 65 characters; `train` int32 `[1003854]`, `val` int32 `[111540]`.

  Raises:
    FileNotFoundError: a given folder does not exist or lacks `input.txt`.
    ShakespeareFileError: the file fails its SHA-256 check (the message names the file, the expected
      checksum and the fix).
    ShakespeareDownloadError: no folder given, the file is in neither tfds' manual dir nor its cache,
      and the download host does not answer (offline) or the download fails.
  """
  path = _download.resolve(_source(), data_dir, probe=_probe, timeout=_PROBE_TIMEOUT_S)["text"]
  stat = path.stat()
  return _load_file((str(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=1)
def _load_file(key: tuple[str, int, int]) -> CharCorpus:
  """Reads, checks and encodes the file `key` names (path, size, mtime)."""
  start = time.perf_counter()
  path = pathlib.Path(key[0])
  stored = path.read_bytes()
  _download.check_sha256(path, stored, OFFICIAL_SHA256, error=ShakespeareFileError,
                         url=_SHAKESPEARE_URL + FILENAME)
  corpus = char_corpus(stored.decode("utf-8"))
  logging.info("Loaded Tiny Shakespeare from %s in %.2f s.", path, time.perf_counter() - start)
  return corpus


def _check_windows(tokens_shape: tuple[int, ...], dtype, *, count: int, batch_size: int,
                   context: int, what: str) -> None:
  """Raises `ValueError` unless `tokens` (1-D integers) holds `count` windows of `context + 1` tokens."""
  if len(tokens_shape) != 1:
    raise ValueError(f"{what}: tokens must be 1-D token ids, got shape {tokens_shape}.")
  if not np.issubdtype(dtype, np.integer):
    raise ValueError(f"{what}: tokens must be integer token ids, got dtype {dtype}.")
  if batch_size < 1 or context < 1:
    raise ValueError(f"{what}: batch_size and context must be >= 1, got {batch_size} and {context}.")
  needed = count + context
  if tokens_shape[0] < needed:
    raise ValueError(
        f"{what}: {tokens_shape[0]} tokens are too few for {count} distinct window(s) of context "
        f"{context} (and their next tokens): at least {needed} are needed. Use a longer split, fewer "
        f"windows or a shorter context."
    )


def validation_windows(tokens: np.ndarray, *, batches: int = 200, batch_size: int = 12,
                       context: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """A fixed, deterministic set of windows of `tokens`: the same evaluation for every method.

  `n = batches * batch_size` windows of `context + 1` tokens start at evenly spaced offsets over the
  whole of `tokens` (length `L`), the first at 0, the last at `L - context - 1` (it ends at the last
  token):

      starts[i] = (i * (L - context - 1)) // (n - 1),   i = 0, ..., n - 1   (starts = [0] if n == 1)

  Window `i` is batch `i // batch_size`, row `i % batch_size`. `inputs` are its first `context`
  tokens, `targets` its last `context` (each input token's next token). No randomness is involved.
  With the defaults on Tiny Shakespeare's validation split (111,540 tokens), 2,400 windows start
  about 46.5 tokens apart, so neighbours overlap and every token but the first is a target at least
  once (153,600 predictions in all).

  Args:
    tokens: int `[L]` token ids, e.g. `CharCorpus.val`.
    batches: number of batches.
    batch_size: windows per batch.
    context: tokens per window's input.

  Returns:
    `(inputs, targets)`, int32 numpy arrays `[batches, batch_size, context]`;
    `targets[b, r, t] == tokens[starts[i] + t + 1]` and `inputs[b, r, t] == tokens[starts[i] + t]`.

  Raises:
    ValueError: `tokens` is not 1-D integers, a size is below 1, or `L < n + context` (too short for
      `n` distinct starts).
  """
  tokens = np.asarray(tokens)
  if batches < 1:
    raise ValueError(f"validation_windows: batches must be >= 1, got {batches}.")
  count = batches * batch_size
  _check_windows(tokens.shape, tokens.dtype, count=count, batch_size=batch_size, context=context,
                 what="validation_windows")
  last = tokens.shape[0] - context - 1
  starts = np.arange(count, dtype=np.int64) * last // max(count - 1, 1)
  windows = tokens[starts[:, None] + np.arange(context + 1)].astype(np.int32)
  windows = windows.reshape(batches, batch_size, context + 1)
  return windows[..., :-1].copy(), windows[..., 1:].copy()


@functools.partial(jax.jit, static_argnames=("batch_size", "context"))
def sample_windows(key: jax.Array, tokens: jax.Array, *, batch_size: int,
                   context: int) -> tuple[jax.Array, jax.Array]:
  """`batch_size` random windows of `tokens`, as nanoGPT's `get_batch`: for training and calibration.

  Each window starts at an offset drawn uniformly from `[0, L - context - 1]` (inclusive, `L =
  len(tokens)`), independently (windows may overlap). Jitted, with `batch_size` and `context` static;
  it may also be called inside another jitted function. Put `tokens` on the device once
  (`jax.device_put`), else every call copies them there.

  Args:
    key: a `jax.random` key; the same key gives the same windows.
    tokens: int `[L]` token ids, e.g. `CharCorpus.train`.
    batch_size: number of windows.
    context: tokens per window's input.

  Returns:
    `(inputs, targets)`, int32 `[batch_size, context]`: `inputs[b] = tokens[s_b : s_b + context]`,
    `targets[b] = tokens[s_b + 1 : s_b + context + 1]`.

  Raises:
    ValueError: `tokens` is not 1-D integers, a size is below 1, or `L < context + 1`.
  """
  _check_windows(tuple(tokens.shape), tokens.dtype, count=1, batch_size=batch_size, context=context,
                 what="sample_windows")
  tokens = jnp.asarray(tokens, dtype=jnp.int32)
  starts = jax.random.randint(key, (batch_size,), 0, tokens.shape[0] - context)  # maxval exclusive.
  windows = tokens[starts[:, None] + jnp.arange(context + 1)]
  return windows[:, :-1], windows[:, 1:]
