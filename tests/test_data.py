"""Tests of prune_jax.data: the IDX parser on tiny hand-written files, where the files come from, the
offline failure, tfds' manual dir and download cache, and the real MNIST (fixtures in conftest.py)."""

import contextlib
import functools
import gzip
import hashlib
import http.server
import pathlib
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from prune_jax import data

# Class counts of the official files.
TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
OFFLINE_DEADLINE_S = 5.0


def write_idx(path: pathlib.Path, array: np.ndarray, *, magic: int | None = None, dims=None,
              extra: bytes = b"", cut: int = 0) -> pathlib.Path:
  """Writes `array` (uint8) as a gzipped IDX file; `magic`/`dims` override the header, `extra` is
  appended to the data, `cut` bytes are dropped from the end of the data."""
  array = np.asarray(array, np.uint8)
  magic = (0x08 << 8) + array.ndim if magic is None else magic
  dims = array.shape if dims is None else dims
  header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in dims)
  body = array.tobytes() + extra
  path.write_bytes(gzip.compress(header + body[:len(body) - cut]))
  return path


def fake_mnist_folder(folder: pathlib.Path, names=data.FILENAMES) -> pathlib.Path:
  """A folder of tiny valid IDX files under the official names (so only their checksums are wrong)."""
  folder.mkdir(parents=True, exist_ok=True)
  for name in names:
    shape = (2, 28, 28) if "images" in name else (2,)
    write_idx(folder / name, np.ones(shape, np.uint8))
  return folder


@pytest.fixture
def no_folder(monkeypatch, tmp_path):
  """No folder given: $PRUNE_JAX_MNIST_DIR unset and tfds' data dir an empty tmp_path/tfds."""
  monkeypatch.delenv(data.ENV_VAR, raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  return tmp_path / "tfds"


@pytest.fixture
def no_network(monkeypatch):
  """Makes any attempt to reach the network (the probe, tfds' download) fail the test."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"network used: {args} {kwargs}")

  monkeypatch.setattr(data, "_probe", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


@contextlib.contextmanager
def serve(folder: pathlib.Path):
  """Serves `folder` over HTTP on localhost; yields the base URL."""
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/"
  finally:
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/"


# --- The IDX parser, on tiny files ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3,), (2, 28, 28), (4, 5, 6)])
def test_read_idx_round_trip(tmp_path, shape):
  array = np.arange(np.prod(shape)).reshape(shape) % 256
  got = data.read_idx(write_idx(tmp_path / "a.gz", array), shape=shape)
  assert got.dtype == np.uint8 and got.shape == shape
  np.testing.assert_array_equal(got, array)


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6)))
def test_read_idx_round_trip_any_shape(tmp_path_factory, array):
  path = write_idx(tmp_path_factory.mktemp("idx") / "a.gz", array)
  np.testing.assert_array_equal(data.read_idx(path), array)
  np.testing.assert_array_equal(data.read_idx(path, shape=array.shape), array)


def test_mnist_magic_numbers():
  assert (data.LABELS_MAGIC, data.IMAGES_MAGIC) == (2049, 2051)


@pytest.mark.parametrize(
    "magic, shape",
    [
        (2051, (3,)),  # An images header where labels are expected...
        (2049, (3, 1, 1)),  # ...and the reverse.
        (0x0D01, None),  # float32 elements.
        (0x01000801, None),  # Non-zero leading byte.
    ],
)
def test_read_idx_wrong_magic(tmp_path, magic, shape):
  path = write_idx(tmp_path / "bad.gz", np.zeros(3, np.uint8), magic=magic, dims=(3,) * (magic & 0xFF))
  with pytest.raises(data.MnistFileError, match=r"bad\.gz: IDX magic number"):
    data.read_idx(path, shape=shape)


def test_read_idx_truncated_data(tmp_path):
  path = write_idx(tmp_path / "short.gz", np.zeros((3, 2, 2), np.uint8), cut=1)
  with pytest.raises(data.MnistFileError, match=r"short\.gz: truncated: 11 data bytes, but .* needs 12"):
    data.read_idx(path)


def test_read_idx_count_in_header_exceeds_data(tmp_path):
  path = write_idx(tmp_path / "count.gz", np.zeros(2, np.uint8), dims=(3,))
  with pytest.raises(data.MnistFileError, match=r"count\.gz: truncated"):
    data.read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
  path = write_idx(tmp_path / "long.gz", np.zeros(2, np.uint8), extra=b"\0")
  with pytest.raises(data.MnistFileError, match=r"long\.gz: has trailing bytes"):
    data.read_idx(path)


def test_read_idx_truncated_header(tmp_path):
  path = tmp_path / "header.gz"
  path.write_bytes(gzip.compress((2051).to_bytes(4, "big") + (1).to_bytes(4, "big")))
  with pytest.raises(data.MnistFileError, match=r"header\.gz: truncated IDX header"):
    data.read_idx(path)


def test_read_idx_shape_differs_from_expected(tmp_path):
  path = write_idx(tmp_path / "n.gz", np.zeros(3, np.uint8))
  with pytest.raises(data.MnistFileError, match=r"n\.gz: IDX header says shape \(3,\), expected \(4,\)"):
    data.read_idx(path, shape=(4,))


def test_read_idx_truncated_gzip(tmp_path):
  path = write_idx(tmp_path / "cut.gz", np.arange(200, dtype=np.uint8))
  path.write_bytes(path.read_bytes()[:-12])
  with pytest.raises(data.MnistFileError, match=r"cut\.gz is not a complete gzip file"):
    data.read_idx(path)


def test_read_idx_not_gzip(tmp_path):
  path = tmp_path / "plain.gz"
  path.write_bytes((2049).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\1")
  with pytest.raises(data.MnistFileError, match=r"plain\.gz is not a complete gzip file"):
    data.read_idx(path)


def test_read_idx_checksum(tmp_path):
  path = write_idx(tmp_path / "sum.gz", np.zeros(3, np.uint8))
  actual = hashlib.sha256(path.read_bytes()).hexdigest()
  np.testing.assert_array_equal(data.read_idx(path, sha256=actual.upper()), np.zeros(3))
  with pytest.raises(data.MnistFileError, match=rf"sum\.gz has the wrong SHA-256(.|\n)*expected {'0' * 64}"
                                                rf"(.|\n)*actual   {actual}(.|\n)*Delete it"):
    data.read_idx(path, sha256="0" * 64)


def test_read_idx_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nothere\.gz does not exist"):
    data.read_idx(tmp_path / "nothere.gz")


# --- Folders: what is checked, and the resolution order ------------------------------------------


def test_official_checksums_match_tfds_registry():
  from tensorflow_datasets.core.download import checksums  # pylint: disable=g-import-not-at-top

  registered = checksums.get_all_url_infos()
  for spec in data._FILES.values():
    info = registered[data._MNIST_URL + spec.filename]
    assert (info.checksum, int(info.size), info.filename) == (spec.sha256, spec.size, spec.filename)


def test_folder_with_wrong_files_fails_checksum(tmp_path):
  folder = fake_mnist_folder(tmp_path / "fake")
  first = data.FILENAMES[0]
  with pytest.raises(data.MnistFileError, match=rf"{first} has the wrong SHA-256(.|\n)*"
                                                rf"expected {data.OFFICIAL_SHA256[first]}"):
    data.load_mnist(folder)


def test_folder_missing_a_file(tmp_path):
  folder = fake_mnist_folder(tmp_path / "three", names=data.FILENAMES[:3])
  with pytest.raises(FileNotFoundError, match=rf"{data.FILENAMES[3]} missing from {folder}") as e:
    data.load_mnist(str(folder))
  assert "--mnist_dir" in str(e.value) and data.FILENAMES[0] + "," in str(e.value)


def test_folder_does_not_exist(tmp_path):
  with pytest.raises(FileNotFoundError, match=rf"MNIST folder {tmp_path / 'nope'} .*does not exist"):
    data.load_mnist(tmp_path / "nope")


def test_argument_wins_over_env_var(tmp_path, monkeypatch):
  monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "from_env"))
  with pytest.raises(FileNotFoundError, match=r"from_arg .*from the `mnist_dir` argument"):
    data.load_mnist(tmp_path / "from_arg")


@pytest.mark.parametrize("argument", [None, ""])
def test_env_var_used_without_argument(tmp_path, monkeypatch, argument):
  monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "from_env"))
  with pytest.raises(FileNotFoundError, match=rf"from_env .*from the environment variable {data.ENV_VAR}"):
    data.load_mnist(argument)


# --- tfds' download manager: offline, manual dir, download and cache -----------------------------


def blackhole_url(stack: contextlib.ExitStack) -> str:
  """A server that accepts connections (through the listen backlog) but never answers."""
  sock = stack.enter_context(socket.socket())
  sock.bind(("127.0.0.1", 0))
  sock.listen(8)
  return f"http://127.0.0.1:{sock.getsockname()[1]}/"


@pytest.mark.parametrize("host", ["refused", "unresolvable", "silent"])
def test_offline_fails_fast_with_instructions(no_folder, monkeypatch, host):
  with contextlib.ExitStack() as stack:
    url = {"refused": closed_port_url, "unresolvable": lambda: "http://mnist.invalid/",
           "silent": lambda: blackhole_url(stack)}[host]()
    monkeypatch.setattr(data, "_MNIST_URL", url)
    monkeypatch.setattr(data, "_PROBE_TIMEOUT_S", 0.5)
    start = time.perf_counter()
    with pytest.raises(data.MnistDownloadError) as e:
      data.load_mnist()
    elapsed = time.perf_counter() - start
  assert elapsed < OFFLINE_DEADLINE_S, elapsed
  message = str(e.value)
  for needed in (*data.FILENAMES, data.ENV_VAR, "--mnist_dir", str(no_folder / "downloads" / "manual"), url):
    assert needed in message, (needed, message)
  assert not (no_folder / "downloads").exists()  # Nothing half-downloaded left behind.


def test_offline_real_host_fails_fast(no_folder):
  """The real case: the real URL, this machine's network, the default probe timeout."""
  if data._probe(data._MNIST_URL + data.FILENAMES[3], timeout=data._PROBE_TIMEOUT_S) is None:
    pytest.skip(f"{data._MNIST_URL} answers: this machine is online, the offline case cannot be tested.")
  start = time.perf_counter()
  with pytest.raises(data.MnistDownloadError, match=r"(?s)not on this machine.*--mnist_dir"):
    data.load_mnist()
  assert time.perf_counter() - start < 2 * data._PROBE_TIMEOUT_S + 2


def test_corrupt_file_in_manual_dir(no_folder, no_network):
  fake_mnist_folder(no_folder / "downloads" / "manual")
  with pytest.raises(data.MnistFileError, match=r"(?s)wrong checksum.*manual.*Delete that file"):
    data.load_mnist()


@pytest.mark.needs_mnist
def test_tfds_manual_dir_used_without_network(mnist_dir, mnist, no_folder, no_network):
  manual = no_folder / "downloads" / "manual"
  manual.mkdir(parents=True)
  for name in data.FILENAMES:
    shutil.copy(pathlib.Path(mnist_dir) / name, manual / name)
  got = data.load_mnist()
  for a, b in zip(got, mnist, strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.needs_mnist
def test_tfds_downloads_once_then_uses_its_cache(mnist_dir, mnist, no_folder, monkeypatch):
  with serve(pathlib.Path(mnist_dir).resolve()) as url:
    monkeypatch.setattr(data, "_MNIST_URL", url)
    downloaded = data.load_mnist()
  cached = sorted(p.name for p in (no_folder / "downloads" / "mnist").iterdir())
  assert len(cached) == 8 and all(name.startswith("127.0.0.1") for name in cached), cached  # 4 files, 4 INFO.
  for a, b in zip(downloaded, mnist, strict=True):
    np.testing.assert_array_equal(a, b)
  # The server is gone: the files must come from tfds' cache, without a probe or a download.
  data._load_files.cache_clear()
  monkeypatch.setattr(data, "_probe", lambda *args, **kwargs: pytest.fail("probed although cached"))
  again = data.load_mnist()
  for a, b in zip(again, mnist, strict=True):
    np.testing.assert_array_equal(a, b)


# --- The real MNIST ----------------------------------------------------------------------------------


@pytest.mark.needs_mnist
def test_real_mnist_shapes_dtypes_ranges(mnist):
  assert isinstance(mnist, data.MNIST)
  for images, labels, n in ((mnist.train_images, mnist.train_labels, 60000),
                            (mnist.test_images, mnist.test_labels, 10000)):
    assert images.shape == (n, 784) and images.dtype == np.float32
    assert labels.shape == (n,) and labels.dtype == np.int32
    assert images.min() == 0.0 and images.max() == 1.0
    assert not images.flags.writeable and not labels.flags.writeable


@pytest.mark.needs_mnist
def test_real_mnist_known_statistics(mnist):
  assert tuple(np.bincount(mnist.train_labels, minlength=10)) == TRAIN_LABEL_COUNTS
  assert tuple(np.bincount(mnist.test_labels, minlength=10)) == TEST_LABEL_COUNTS
  assert list(mnist.train_labels[:5]) == [5, 0, 4, 1, 9] and list(mnist.test_labels[:3]) == [7, 2, 1]
  assert mnist.train_images.mean() == pytest.approx(0.1307, abs=1e-4)
  assert mnist.train_images.std() == pytest.approx(0.3081, abs=1e-4)
  # Pixels are k / 255 exactly: the first image's pixel values times 255 are whole numbers.
  np.testing.assert_array_equal(np.round(mnist.train_images[0] * 255) / np.float32(255), mnist.train_images[0])


@pytest.mark.needs_mnist
def test_real_mnist_from_env_var_and_cached(mnist_dir, mnist, monkeypatch):
  monkeypatch.setenv(data.ENV_VAR, str(mnist_dir))
  first = data.load_mnist()
  start = time.perf_counter()
  assert data.load_mnist() is first and data.load_mnist(mnist_dir) is first
  assert time.perf_counter() - start < 0.1
  for a, b in zip(first, mnist, strict=True):
    np.testing.assert_array_equal(a, b)
