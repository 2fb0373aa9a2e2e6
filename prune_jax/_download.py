"""Where a data set's files come from: shared by the MNIST (`data.py`) and Tiny Shakespeare
(`text_data.py`) loaders.

First match wins:

1. the folder the caller passes (the experiments' `--<name>_dir` flag);
2. the folder named by the data set's environment variable;
3. tensorflow-datasets' download manager (`tfds.download.DownloadManager`, no TensorFlow needed), as
   tfds' own builder uses it: files a user placed in its manual dir `<data_dir>/downloads/manual`, else
   its download cache `<data_dir>/downloads/<tfds name>`, else a download from the URLs tfds registers,
   checked against the registered checksums. `<data_dir>` is `$TFDS_DATA_DIR`, default
   `~/tensorflow_datasets`.

tfds retries a failing download with backoff for minutes, so before it is asked to download, a short
probe of the download host (`probe`) makes an offline machine fail within seconds, with a message
(`offline_message`) saying where to put the files. The loaders check every file's SHA-256 before use
(`check_sha256`), whatever its source.

The loaders pass their own `probe` and timeout (module attributes there, which tests replace).
"""

import hashlib
import os
import pathlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from absl import logging

PathLike = str | os.PathLike
# `probe(url, *, timeout)`: None if `url` answers, else what went wrong.
Probe = Callable[..., str | None]


class RemoteFile(NamedTuple):
  """One official file of a data set, as tfds registers it.

  Attributes:
    filename: its official name, e.g. `"input.txt"`; the same in a folder and in tfds' manual dir.
    sha256: its hex SHA-256 (lower case).
    size: its size in bytes.
  """

  filename: str
  sha256: str
  size: int


class Source(NamedTuple):
  """A data set's files and how its loader is called (for the resolution and its messages).

  Attributes:
    title: the data set's name in messages, e.g. `"MNIST"`.
    tfds_name: tfds' name of the data set, e.g. `"mnist"`: the download cache's subfolder.
    base_url: the files' URLs are `base_url + filename`.
    files: `{key: RemoteFile}`, the loader's name for each file (resolution returns the same keys).
    function: the loader, e.g. `"load_mnist"`.
    argument: the loader's folder argument, e.g. `"mnist_dir"`.
    flag: the experiments' flag passing that argument, e.g. `"--mnist_dir"`.
    env_var: the environment variable naming a folder, e.g. `"PRUNE_JAX_MNIST_DIR"`.
    file_error: raised for a file with the wrong checksum (the loader's `...FileError`).
    download_error: raised when the files are not here and cannot be downloaded.
  """

  title: str
  tfds_name: str
  base_url: str
  files: Mapping[str, RemoteFile]
  function: str
  argument: str
  flag: str
  env_var: str
  file_error: type[Exception]
  download_error: type[Exception]

  def urls(self) -> dict[str, str]:
    """`{key: url}` of the files."""
    return {key: self.base_url + f.filename for key, f in self.files.items()}

  def filenames(self) -> list[str]:
    return [f.filename for f in self.files.values()]

  def home(self) -> str:
    """Where the files are: the file's URL if there is one file, else `base_url`."""
    return self.base_url + self.filenames()[0] if len(self.files) == 1 else self.base_url

  def the_files(self) -> str:
    """`"the official file input.txt"`, `"the 4 official files a, b, c, d"`: for messages."""
    if len(self.files) == 1:
      return f"the official file {self.filenames()[0]}"
    return f"the {len(self.files)} official files {', '.join(self.filenames())}"


def resolve(source: Source, folder: PathLike | None, *, probe: Probe,
            timeout: float) -> dict[str, pathlib.Path]:
  """Finds the files of `source`: in `folder`, else in `$<env_var>`, else through tfds' manager.

  A folder that is given must hold all the files; there is no fallback from a given folder to a
  download. Nothing here checks the files' contents: the caller checks their SHA-256 (`check_sha256`).

  Args:
    source: the data set.
    folder: the folder from the loader's argument; `None` or `""` means not given.
    probe: `probe(url, *, timeout) -> None | problem`, asked before tfds would download.
    timeout: the probe's timeout, seconds.

  Returns:
    `{key: resolved path}`, the keys of `source.files`.

  Raises:
    FileNotFoundError: a given folder does not exist or lacks some of the files (all named).
    source.file_error: tfds found a file with the wrong checksum in its manual dir or cache.
    source.download_error: the files are not on this machine and could not be downloaded.
  """
  if folder is not None and os.fspath(folder) != "":
    where_from = f"the `{source.argument}` argument (`{source.flag}` flag)"
    return paths_in_folder(source, folder, where_from=where_from)
  if os.environ.get(source.env_var):
    where_from = f"the environment variable {source.env_var}"
    return paths_in_folder(source, os.environ[source.env_var], where_from=where_from)
  return paths_from_tfds(source, probe=probe, timeout=timeout)


def paths_in_folder(source: Source, folder: PathLike, *, where_from: str) -> dict[str, pathlib.Path]:
  """Returns `{key: path}` of the files in `folder`, or raises `FileNotFoundError` naming what is missing."""
  folder = pathlib.Path(folder).expanduser()
  where = f"{folder} (resolved: {folder.resolve()}, from {where_from})"
  if not folder.is_dir():
    raise FileNotFoundError(
        f"{source.title} folder {where} does not exist or is not a folder. It must hold "
        f"{source.the_files()} (from {source.home()})."
    )
  paths = {key: (folder / f.filename).resolve() for key, f in source.files.items()}
  missing = [source.files[key].filename for key, path in paths.items() if not path.is_file()]
  if missing:
    raise FileNotFoundError(
        f"{source.title} file(s) {', '.join(missing)} missing from {where}. The folder must hold "
        f"{source.the_files()}; get them from {source.home()}."
    )
  return paths


def tfds_data_dir() -> pathlib.Path:
  """tfds' data dir, as `tensorflow_datasets.core.constants.get_default_data_dir` computes it."""
  return pathlib.Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def paths_from_tfds(source: Source, *, probe: Probe, timeout: float) -> dict[str, pathlib.Path]:
  """Gets the files through tfds' download manager: manual dir, else its cache, else a download.

  Probes the host first (`probe(url, timeout=timeout)`) unless every file is in the manual dir or the
  cache. Raises as `resolve` does.
  """
  download_dir = tfds_data_dir() / "downloads"
  manual_dir = download_dir / "manual"
  urls = source.urls()

  # tfds (about 0.3 s to import) is needed only here; importing it does not import TensorFlow.
  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.download import checksums as tfds_checksums
  from tensorflow_datasets.core.download import download_manager as tfds_dm
  # pylint: enable=g-import-not-at-top

  # tfds retries a failing download with backoff for minutes, so first make sure it will not need the
  # network, or that the network answers.
  not_local = [
      key for key, f in source.files.items()
      if not in_tfds_manual_dir_or_cache(download_dir, manual_dir, urls[key], f, source.tfds_name)
  ]
  missing = [source.files[key].filename for key in not_local]
  if not_local:
    start = time.perf_counter()
    problem = probe(urls[not_local[0]], timeout=timeout)
    if problem is not None:
      seconds = time.perf_counter() - start
      raise source.download_error(offline_message(source, manual_dir, missing, problem, seconds))

  url_infos = {
      urls[key]: tfds_checksums.UrlInfo(size=f.size, checksum=f.sha256, filename=f.filename)
      for key, f in source.files.items()
  }
  manager = tfds.download.DownloadManager(
      download_dir=download_dir,
      manual_dir=manual_dir,
      url_infos=url_infos,
      dataset_name=source.tfds_name,
      force_checksums_validation=True,
  )
  try:
    paths = manager.download(urls)
  except tfds_dm.NonMatchingChecksumError as e:
    raise source.file_error(
        f"tfds found a {source.title} file with the wrong checksum (corrupt, truncated or not the official "
        f"file):\n{e}\nDelete that file: tfds downloads it again, or put the official file in {manual_dir}."
    ) from e
  except Exception as e:  # DownloadError, requests' errors, OSError...: all mean "could not download".
    raise source.download_error(
        offline_message(source, manual_dir, missing, f"{type(e).__name__}: {e}", None)
    ) from e
  logging.info("%s files from tfds' download manager: %s", source.title,
               {k: str(v) for k, v in paths.items()})
  return {key: pathlib.Path(os.fspath(path)).resolve() for key, path in paths.items()}


def in_tfds_manual_dir_or_cache(download_dir: pathlib.Path, manual_dir: pathlib.Path, url: str,
                                remote: RemoteFile, tfds_name: str) -> bool:
  """Whether tfds' manager would find the file without the network: in its manual dir or its cache."""
  if (manual_dir / remote.filename).is_file():
    return True
  try:
    # The cache layout of `DownloadManager._get_dl_path`: `<download_dir>[/<dataset>]/<url><checksum>`
    # `.<ext>` next to a `.INFO` file. If a tfds upgrade changes it, this says "not cached": we probe.
    from tensorflow_datasets.core.download import resource  # pylint: disable=g-import-not-at-top

    fname = resource.get_dl_fname(url, remote.sha256)
  except Exception:  # pylint: disable=broad-except
    return False
  for folder in (download_dir / tfds_name, download_dir):
    cached = folder / fname
    if cached.is_file() and cached.with_suffix(cached.suffix + ".INFO").is_file():
      return True
  return False


def probe(url: str, *, timeout: float) -> str | None:
  """Returns None if `url` answers HTTP 200 within about `timeout` seconds, else what went wrong.

  Uses `requests`, as tfds does (so `HTTPS_PROXY` & co. apply), without retries, reading only the
  headers. `requests`' timeouts do not cover the DNS lookup, so the request runs in a daemon thread that
  is abandoned after `2 * timeout`.
  """
  outcome: list[str | None] = []

  def get() -> None:
    try:
      import requests  # pylint: disable=g-import-not-at-top

      with requests.get(url, stream=True, timeout=timeout) as response:
        outcome.append(None if response.status_code == 200 else f"HTTP {response.status_code} from {url}")
    except Exception as e:  # pylint: disable=broad-except
      outcome.append(f"{type(e).__name__}: {e}")

  thread = threading.Thread(target=get, name="download-probe", daemon=True)
  thread.start()
  thread.join(2 * timeout)
  if not outcome:
    return f"no answer from {url} within {2 * timeout:g} s"
  return outcome[0]


def offline_message(source: Source, manual_dir: pathlib.Path, missing: Sequence[str], problem: str,
                    seconds: float | None) -> str:
  """What to do when the files are not here and cannot be downloaded: every place they may go."""
  took = "" if seconds is None else f" (gave up after {seconds:.1f} s)"
  them = "it" if len(source.files) == 1 else "them"
  return (
      f"{source.title} is not on this machine and could not be downloaded from {source.base_url}{took}: "
      f"{problem}\n"
      f"Not in tfds' manual dir or download cache: {', '.join(missing)}.\n"
      f"Get {source.the_files()} (from {source.home()}) and either\n"
      f"  * put {them} in a folder and pass it as `{source.function}({source.argument}=...)` / the "
      f"experiments' `{source.flag}` flag,\n"
      f"  * or put {them} in a folder and set the environment variable {source.env_var} to it,\n"
      f"  * or put {them} in tfds' manual dir {manual_dir} (that is $TFDS_DATA_DIR/downloads/manual)."
  )


def check_sha256(path: PathLike, stored: bytes, sha256: str, *, error: type[Exception],
                 url: str | None = None) -> None:
  """Raises `error` naming `path`, the expected and actual SHA-256 and the fix, unless `stored` (the
  bytes of `path`) has the hex SHA-256 `sha256` (either case). `url`: where the official file is."""
  actual = hashlib.sha256(stored).hexdigest()
  if actual != sha256.lower():
    path = pathlib.Path(path)
    where = "" if url is None else f" (from {url})"
    raise error(
        f"{path} has the wrong SHA-256 (corrupt, truncated or not the official file):\n"
        f"  expected {sha256.lower()}\n  actual   {actual} ({len(stored)} bytes)\n"
        f"Delete it and put the official {path.name}{where} there, or re-download it."
    )
