"""Tests of prune_jax.text_data: the vocabulary and splits on tiny texts and on the real Tiny
Shakespeare (fixtures in conftest.py), where `input.txt` comes from (folder, environment variable, tfds'
manual dir, download and cache), the offline failure, and the evaluation and training windows."""

import contextlib
import shutil
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_jax import text_data
from test_data import blackhole_url, closed_port_url, serve  # The same local servers as MNIST's tests.

# The real file's vocabulary and sizes (nanoGPT's `data/shakespeare_char/prepare.py` prints the same).
VOCAB = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
NUM_CHARS = 1_115_394
TRAIN_CHARS, VAL_CHARS = 1_003_854, 111_540
OFFLINE_DEADLINE_S = 5.0


@pytest.fixture
def no_folder(monkeypatch, tmp_path):
  """No folder given: $PRUNE_JAX_SHAKESPEARE_DIR unset and tfds' data dir an empty tmp_path/tfds."""
  monkeypatch.delenv(text_data.ENV_VAR, raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  return tmp_path / "tfds"


@pytest.fixture
def no_network(monkeypatch):
  """Makes any attempt to reach the network (the probe, tfds' download) fail the test."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"network used: {args} {kwargs}")

  monkeypatch.setattr(text_data, "_probe", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


def altered_copy(shakespeare_dir, folder):
  """`folder/input.txt`: the real text with its first character changed (same size, wrong SHA-256)."""
  folder.mkdir(parents=True, exist_ok=True)
  text = (shakespeare_dir / text_data.FILENAME).read_bytes()
  (folder / text_data.FILENAME).write_bytes(b"f" + text[1:])
  return folder


# --- Vocabulary, splits, encode and decode on tiny texts ------------------------------------------


def test_char_corpus_of_a_small_text():
  corpus = text_data.char_corpus("hello world")
  assert corpus.vocab == " dehlorw" and corpus.vocab_size == 8
  assert len(corpus.train) == int(0.9 * 11) == 9  # "hello wor" | "ld", as nanoGPT splits.
  np.testing.assert_array_equal(corpus.train, [3, 2, 4, 4, 5, 0, 7, 5, 6])
  np.testing.assert_array_equal(corpus.val, [4, 1])
  for split in (corpus.train, corpus.val):
    assert split.dtype == np.int32 and not split.flags.writeable


@settings(max_examples=25, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_round_trip_any_text(text):
  corpus = text_data.char_corpus(text)
  assert corpus.vocab == "".join(sorted(set(text)))
  assert len(corpus.train) == int(0.9 * len(text)) and len(corpus.val) == len(text) - len(corpus.train)
  assert corpus.decode(np.concatenate([corpus.train, corpus.val])) == text
  assert corpus.decode(corpus.encode(text)) == text


def test_encode_names_unknown_characters():
  corpus = text_data.char_corpus("abc")
  with pytest.raises(ValueError, match=r"2 character\(s\) not in the vocabulary of 3 characters 'abc': "
                                       r"'d', 'é' \(the first at position 1\)"):
    corpus.encode("adéa")
  with pytest.raises(TypeError, match="encode takes a str"):
    corpus.encode(b"abc")


@pytest.mark.parametrize("ids, error, message", [
    ([0, 3], ValueError, r"token id 3 at position 1 is outside the vocabulary's ids \[0, 3\)"),
    ([-1], ValueError, r"token id -1 at position 0"),
    ([0.0], TypeError, r"must be integers, got dtype float64"),
    ([[0, 1]], ValueError, r"shape \[n\], got shape \(1, 2\)"),
])
def test_decode_rejects_bad_ids(ids, error, message):
  with pytest.raises(error, match=message):
    text_data.char_corpus("abc").decode(ids)


def test_decode_takes_jax_arrays_and_scalars():
  corpus = text_data.char_corpus("abc")
  assert corpus.decode(jnp.array([2, 0], jnp.int32)) == "ca" and corpus.decode(np.int32(1)) == "b"
  assert corpus.decode(np.array([], np.int32)) == ""


def test_empty_text_rejected():
  with pytest.raises(ValueError, match="non-empty"):
    text_data.char_corpus("")


# --- The real Tiny Shakespeare ------------------------------------------------------------------


def test_real_corpus_vocab_and_splits(shakespeare, shakespeare_dir):
  assert isinstance(shakespeare, text_data.CharCorpus)
  assert shakespeare.vocab == VOCAB and shakespeare.vocab_size == 65
  assert (len(shakespeare.train), len(shakespeare.val)) == (TRAIN_CHARS, VAL_CHARS)
  for split in (shakespeare.train, shakespeare.val):
    assert split.dtype == np.int32 and not split.flags.writeable
  text = (shakespeare_dir / text_data.FILENAME).read_text(encoding="utf-8")
  assert len(text) == NUM_CHARS and text.startswith("First Citizen:\n")
  assert shakespeare.decode(shakespeare.train) + shakespeare.decode(shakespeare.val) == text
  np.testing.assert_array_equal(shakespeare.encode(text[TRAIN_CHARS:]), shakespeare.val)


def test_official_checksum_matches_tfds_registry():
  import tensorflow_datasets  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.download import checksums  # pylint: disable=g-import-not-at-top

  package = tensorflow_datasets.__path__[0]
  registered = checksums.load_url_infos(f"{package}/datasets/tiny_shakespeare/checksums.tsv")
  info = registered[text_data._SHAKESPEARE_URL + text_data.FILENAME]
  assert (info.checksum, int(info.size), info.filename) == (text_data.OFFICIAL_SHA256, text_data.SIZE,
                                                            text_data.FILENAME)


def test_wrong_file_fails_checksum(shakespeare_dir, tmp_path):
  folder = altered_copy(shakespeare_dir, tmp_path / "altered")
  url = text_data._SHAKESPEARE_URL + text_data.FILENAME
  expected = (rf"(?s)altered/input\.txt has the wrong SHA-256.*expected {text_data.OFFICIAL_SHA256}.*"
              rf"Delete it and put the official input\.txt \(from {url}\)")
  with pytest.raises(text_data.ShakespeareFileError, match=expected):
    text_data.load_shakespeare(folder)


def test_folder_does_not_exist(tmp_path):
  expected = (rf"(?s)Tiny Shakespeare folder {tmp_path / 'nope'} .*"
              rf"from the `data_dir` argument \(`--shakespeare_dir` flag\).*does not exist.*input\.txt")
  with pytest.raises(FileNotFoundError, match=expected):
    text_data.load_shakespeare(tmp_path / "nope")


def test_folder_without_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=rf"input\.txt missing from {tmp_path}"):
    text_data.load_shakespeare(str(tmp_path))


def test_argument_wins_over_env_var(tmp_path, monkeypatch):
  monkeypatch.setenv(text_data.ENV_VAR, str(tmp_path / "from_env"))
  with pytest.raises(FileNotFoundError, match=r"from_arg .*from the `data_dir` argument"):
    text_data.load_shakespeare(tmp_path / "from_arg")


@pytest.mark.parametrize("argument", [None, ""])
def test_env_var_used_without_argument(shakespeare_dir, shakespeare, monkeypatch, argument):
  monkeypatch.setenv(text_data.ENV_VAR, str(shakespeare_dir))
  first = text_data.load_shakespeare(argument)
  start = time.perf_counter()
  assert text_data.load_shakespeare() is first and text_data.load_shakespeare(shakespeare_dir) is first
  assert time.perf_counter() - start < 0.1  # Cached: the same file is not read again.
  assert first.vocab == shakespeare.vocab
  np.testing.assert_array_equal(first.train, shakespeare.train)


# --- tfds' download manager: offline, manual dir, download and cache -----------------------------


@pytest.mark.parametrize("host", ["refused", "unresolvable", "silent"])
def test_offline_fails_fast_with_instructions(no_folder, monkeypatch, host):
  with contextlib.ExitStack() as stack:
    url = {"refused": closed_port_url, "unresolvable": lambda: "http://shakespeare.invalid/",
           "silent": lambda: blackhole_url(stack)}[host]()
    monkeypatch.setattr(text_data, "_SHAKESPEARE_URL", url)
    monkeypatch.setattr(text_data, "_PROBE_TIMEOUT_S", 0.5)
    start = time.perf_counter()
    with pytest.raises(text_data.ShakespeareDownloadError) as e:
      text_data.load_shakespeare()
    elapsed = time.perf_counter() - start
  assert elapsed < OFFLINE_DEADLINE_S, elapsed
  message = str(e.value)
  for needed in (text_data.FILENAME, text_data.ENV_VAR, "--shakespeare_dir",
                 "load_shakespeare(data_dir=...)", str(no_folder / "downloads" / "manual"), url):
    assert needed in message, (needed, message)
  assert not (no_folder / "downloads").exists()  # Nothing half-downloaded left behind.


def test_offline_real_host_fails_fast(no_folder):
  """The real case: the real URL, this machine's network, the default probe timeout."""
  url = text_data._SHAKESPEARE_URL + text_data.FILENAME
  if text_data._probe(url, timeout=text_data._PROBE_TIMEOUT_S) is None:
    pytest.skip(f"{url} answers: this machine is online, the offline case cannot be tested.")
  start = time.perf_counter()
  expected = r"(?s)not on this machine.*--shakespeare_dir"
  with pytest.raises(text_data.ShakespeareDownloadError, match=expected):
    text_data.load_shakespeare()
  assert time.perf_counter() - start < OFFLINE_DEADLINE_S


def test_corrupt_file_in_manual_dir(shakespeare_dir, no_folder, no_network):
  altered_copy(shakespeare_dir, no_folder / "downloads" / "manual")
  expected = r"(?s)wrong checksum.*manual.*Delete that file"
  with pytest.raises(text_data.ShakespeareFileError, match=expected):
    text_data.load_shakespeare()


def test_tfds_manual_dir_used_without_network(shakespeare_dir, shakespeare, no_folder, no_network):
  manual = no_folder / "downloads" / "manual"
  manual.mkdir(parents=True)
  shutil.copy(shakespeare_dir / text_data.FILENAME, manual / text_data.FILENAME)
  got = text_data.load_shakespeare()
  assert got.vocab == shakespeare.vocab
  np.testing.assert_array_equal(got.val, shakespeare.val)


def test_tfds_downloads_once_then_uses_its_cache(shakespeare_dir, shakespeare, no_folder, monkeypatch):
  with serve(shakespeare_dir.resolve()) as url:
    monkeypatch.setattr(text_data, "_SHAKESPEARE_URL", url)
    downloaded = text_data.load_shakespeare()
  cached = sorted(p.name for p in (no_folder / "downloads" / "tiny_shakespeare").iterdir())
  assert len(cached) == 2 and all(name.startswith("127.0.0.1") for name in cached), cached  # File, INFO.
  np.testing.assert_array_equal(downloaded.train, shakespeare.train)
  # The server is gone: the file must come from tfds' cache, without a probe or a download.
  text_data._load_file.cache_clear()
  monkeypatch.setattr(text_data, "_probe", lambda *args, **kwargs: pytest.fail("probed although cached"))
  again = text_data.load_shakespeare()
  assert again.vocab == shakespeare.vocab
  np.testing.assert_array_equal(again.val, shakespeare.val)


# --- Evaluation windows -------------------------------------------------------------------------


def test_validation_windows_follow_the_formula():
  tokens = np.arange(1000, dtype=np.int32) * 3  # Distinct values: a window shows where it starts.
  inputs, targets = text_data.validation_windows(tokens, batches=3, batch_size=4, context=10)
  assert inputs.shape == targets.shape == (3, 4, 10)
  assert inputs.dtype == targets.dtype == np.int32
  starts = [i * (1000 - 10 - 1) // (12 - 1) for i in range(12)]
  assert starts[0] == 0 and starts[-1] == 989
  for i, start in enumerate(starts):
    np.testing.assert_array_equal(inputs[i // 4, i % 4], tokens[start:start + 10])
    np.testing.assert_array_equal(targets[i // 4, i % 4], tokens[start + 1:start + 11])


def test_validation_windows_real_defaults(shakespeare):
  inputs, targets = text_data.validation_windows(shakespeare.val)
  assert inputs.shape == targets.shape == (200, 12, 64)
  assert inputs.dtype == targets.dtype == np.int32
  np.testing.assert_array_equal(targets[..., :-1], inputs[..., 1:])
  np.testing.assert_array_equal(inputs[0, 0], shakespeare.val[:64])
  np.testing.assert_array_equal(targets[-1, -1], shakespeare.val[-64:])  # The last token is a target.
  again = text_data.validation_windows(jnp.asarray(shakespeare.val))  # Deterministic, any array type.
  np.testing.assert_array_equal(again[0], inputs)
  np.testing.assert_array_equal(again[1], targets)


def test_validation_windows_need_distinct_starts():
  inputs, _ = text_data.validation_windows(np.arange(14), batches=2, batch_size=2, context=10)
  np.testing.assert_array_equal(inputs[:, :, 0].ravel(), [0, 1, 2, 3])  # Shortest: starts 1 apart.
  with pytest.raises(ValueError, match=r"13 tokens are too few for 4 distinct window\(s\) of context 10 "
                                       r"(.*)at least 14 are needed"):
    text_data.validation_windows(np.arange(13), batches=2, batch_size=2, context=10)


@pytest.mark.parametrize("tokens, kwargs, message", [
    (np.zeros((2, 100), np.int32), {}, r"must be 1-D"),
    (np.zeros(100, np.float32), {}, r"must be integer token ids"),
    (np.zeros(100, np.int32), {"batches": 0}, r"batches must be >= 1"),
    (np.zeros(100, np.int32), {"context": 0}, r"context must be >= 1"),
])
def test_validation_windows_reject_bad_arguments(tokens, kwargs, message):
  with pytest.raises(ValueError, match=message):
    text_data.validation_windows(tokens, **{"batches": 2, "batch_size": 2, "context": 4, **kwargs})


# --- Random training windows --------------------------------------------------------------------


def test_sample_windows_under_jit():
  length, context = 40, 8
  tokens = jnp.arange(length, dtype=jnp.int32) + 100  # Window values give their start.
  traces = []

  @jax.jit
  def step(key):
    traces.append(1)
    return text_data.sample_windows(key, tokens, batch_size=16, context=context)

  draws = [step(jax.random.key(i)) for i in range(30)]
  assert len(traces) == 1  # One compilation for every key.
  inputs, targets = draws[0]
  assert inputs.shape == targets.shape == (16, context) and inputs.dtype == targets.dtype == jnp.int32
  starts = np.concatenate([np.asarray(x[:, 0]) - 100 for x, _ in draws])
  assert starts.min() == 0 and starts.max() == length - context - 1  # The whole range, inclusive.
  for x, y in draws:
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(context))  # Contiguous windows...
    np.testing.assert_array_equal(y, x + 1)  # ...and their next tokens.
  same = text_data.sample_windows(jax.random.key(0), tokens, batch_size=16, context=context)
  np.testing.assert_array_equal(same[0], inputs)  # Same key, same windows, jitted or not.
  assert not np.array_equal(draws[1][0], inputs)


def test_sample_windows_real_tokens(shakespeare):
  train = jax.device_put(shakespeare.train)
  inputs, targets = text_data.sample_windows(jax.random.key(0), train, batch_size=12, context=64)
  assert inputs.shape == (12, 64)
  np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
  assert 0 <= int(inputs.min()) and int(inputs.max()) < shakespeare.vocab_size


def test_sample_windows_too_short():
  with pytest.raises(ValueError, match=r"8 tokens are too few .* context 8 .*at least 9 are needed"):
    text_data.sample_windows(jax.random.key(0), jnp.arange(8), batch_size=2, context=8)
