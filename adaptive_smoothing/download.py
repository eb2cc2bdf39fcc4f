"""Download the published checkpoints (the table in published.py) into the layout of
docs/METHOD.md, "Published models": glue over the field's download libraries.

- Google Drive files (the BiT STD models and the mixers): ``gdown``, which follows Drive's
  "can't scan for viruses" confirmation page. With ``resume=True`` gdown continues its own
  temporary file ``<target>.part<random>tmp`` with an HTTP Range request (it does not check that
  the server honoured the Range; Google's does).
- Every other file (Hugging Face, through ``huggingface_hub``'s URL for the configured endpoint;
  GCS; any URL given to :func:`download_file`): ``huggingface_hub``'s resumable ``http_get`` into
  ``<target>.part``: an interrupted download continues with an HTTP Range request, a server that
  ignores the Range restarts the file, short network failures are retried (it writes whole
  10 MiB chunks, so what arrived of the chunk a connection broke in is fetched again). torch.hub's
  ``download_url_to_file`` is not used: it cannot resume (it drops its partial file).

A file is renamed onto its target only once it passed the checks: size and sha256 where known,
and torch's magic bytes (zip or pickle), so that a Google Drive HTML page never ends up where a
checkpoint is expected. Progress bars are tqdm's (the libraries' own).

Base URLs can be overridden per host, by argument (``base_urls={"gdrive": ...}``) or by the
environment (``ADAPTIVE_SMOOTHING_BASE_URL_GDRIVE=...``; likewise HUGGINGFACE, GCS).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from tqdm import tqdm

from adaptive_smoothing.errors import UserError
from adaptive_smoothing.published import (DEFAULT_BASE_URLS, PUBLISHED_MODELS, WEIGHT_FILES,
                                          WeightFile, resolve_base_urls)

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
SOURCES: tuple[WeightFile, ...] = WEIGHT_FILES
# torch.save writes a zip archive (torch >= 1.6) or, in the legacy format, a pickle stream.
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body")


class DownloadError(UserError, RuntimeError):
    """A checkpoint could not be fetched or verified; the message names the URL and target."""


def route_library_logs() -> None:
    """Print huggingface_hub's log lines (its "Retrying in 1s [Retry 1/5]") once, through the
    root logger's handler: at import it installs a stderr handler of its own and also
    propagates to the root logger, so a command that configured logging printed each twice.
    Call it after ``logging.basicConfig``."""
    try:
        import huggingface_hub.utils.logging  # noqa: F401  (installs the handler, once)
    except ImportError:
        return
    library = logging.getLogger("huggingface_hub")
    for handler in list(library.handlers):
        library.removeHandler(handler)
    library.propagate = True


def select_sources(names: Optional[Iterable[str]] = None, dataset: Optional[str] = None,
                   model: Optional[str] = None,
                   sources: Sequence[WeightFile] = SOURCES) -> list[WeightFile]:
    """Entries by name and/or dataset; ``model`` ('edm', 'trades', 'mixednuts') picks the
    files that published model needs (its STD, ROB and mixer, for each dataset it has)."""
    chosen = list(sources)
    if names:
        wanted = list(dict.fromkeys(names))
        known = {s.name for s in sources}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(f"unknown checkpoint name(s) {unknown}; "
                             f"known: {', '.join(sorted(known))}")
        chosen = [s for s in chosen if s.name in wanted]
    if dataset is not None:
        ds = dataset.strip().lower().replace("-", "").replace("_", "")
        if ds not in {s.dataset for s in sources}:
            raise ValueError(f"unknown dataset {dataset!r}; expected cifar10 or cifar100")
        chosen = [s for s in chosen if s.dataset == ds]
    if model is not None:
        # From the table: a file can serve several models (the CIFAR-100 EDM ROB is MixedNUTS's).
        needed = {f.name for spec in PUBLISHED_MODELS.values() if spec.name == model
                  for f in spec.files}
        chosen = [s for s in chosen if s.name in needed]
    return chosen


# ----------------------------------------------------------------------------- checks


def _part(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _bad_page(head: bytes, url: str, target: Path) -> Optional[str]:
    if head.lstrip()[:15].lower().startswith(_HTML_STARTS):
        return (f"got an HTML page instead of a checkpoint from {url}; Google Drive quota "
                "exceeded or the file is not public? Try again later or download it in a "
                f"browser to {target}. Not saved.")
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_and_promote(part: Path, target: Path, url: str, size: Optional[int],
                        sha256: Optional[str]) -> Path:
    """Rename ``part`` onto ``target`` if it is right; otherwise drop it (it cannot be resumed
    into anything good) and raise."""
    actual = part.stat().st_size
    with open(part, "rb") as f:
        head = f.read(64)
    page = _bad_page(head, url, target)
    problem = None
    if size is not None and actual != size:
        problem = f"size {actual} bytes, expected {size}"
    elif page is None and not head.startswith(TORCH_MAGIC):
        problem = f"not a torch checkpoint (first bytes {head[:8]!r})"
    elif page is None and sha256 is not None and _sha256(part) != sha256.lower():
        problem = f"sha256 does not match {sha256}"
    if page is not None or problem is not None:
        part.unlink()
        raise DownloadError(page or f"{url}: downloaded file is bad ({problem}); not saved to "
                                    f"{target}")
    os.replace(part, target)
    return target


# ----------------------------------------------------------------------------- transports


class _NoBar(tqdm):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002,ANN003 -- tqdm's signature
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _http_get(url: str, part: Path, target: Path, desc: str, progress: bool) -> None:
    """huggingface_hub's resumable GET of ``url``, appended to ``part``."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    offset = part.stat().st_size if part.exists() else 0
    try:
        with open(part, "ab") as out:
            http_get(url, out, resume_size=offset, displayed_filename=desc,
                     tqdm_class=None if progress else _NoBar)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        total = (exc.response.headers.get("Content-Range", "").rpartition("/")[2]
                 if exc.response is not None else "")
        if status == 416 and offset and total == str(offset):
            logger.info("%s: %s is already complete", desc, part)
            return
        if part.exists() and part.stat().st_size == 0:
            part.unlink()
        if status == 416 and offset:
            part.unlink()  # the server does not know this file's size: start over
            logger.warning("%s: server refused to resume %s (%d bytes); starting over",
                           desc, part, offset)
            return _http_get(url, part, target, desc, progress)
        raise DownloadError(f"HTTP {status} for {url} (target {target}): "
                            f"{str(exc).splitlines()[0]}") from exc
    except httpx2.ConnectError as exc:
        if part.exists() and part.stat().st_size == 0:
            part.unlink()
        raise DownloadError(f"cannot reach {url} (target {target}): {exc}") from exc
    except (httpx2.TransportError, OSError) as exc:
        got = part.stat().st_size if part.exists() else 0
        raise DownloadError(f"truncated download from {url}: got {got} bytes ({exc}); the "
                            f"partial file is kept at {part}, run again to resume") from exc


def _gdown(url: str, part: Path, target: Path, progress: bool) -> None:
    """gdown's download of a Drive file (confirmation page followed) to ``part``."""
    import gdown
    import requests
    from gdown.exceptions import FileURLRetrievalError

    try:
        # use_cookies=False: gdown would otherwise read and write ~/.cache/gdown/cookies.txt.
        done = gdown.download(url, str(part), quiet=not progress, use_cookies=False,
                              resume=True)
    except FileURLRetrievalError as exc:
        raise DownloadError(_bad_page(b"<html", url, target) + f" ({exc})") from exc
    except requests.ConnectionError as exc:
        raise DownloadError(f"cannot reach {url} (target {target}): {exc}") from exc
    except requests.RequestException as exc:
        raise DownloadError(f"truncated download from {url} ({exc}); the partial file is kept "
                            f"at {part}<random>tmp, run again to resume") from exc
    if done is None:  # gdown found several temporary files and would not choose
        raise DownloadError(f"{url}: several partial downloads {part}*tmp; delete all but one "
                            f"(or all) and run again; not saved to {target}")


# ----------------------------------------------------------------------------- public API


def download_file(url: str, target: PathLike, *, size: Optional[int] = None,
                  sha256: Optional[str] = None, force: bool = False, progress: bool = True,
                  desc: Optional[str] = None, drive: bool = False) -> Path:
    """Fetch ``url`` to ``target`` (resumable, verified, atomic); ``drive``: through gdown.

    Returns the target path; an existing target is kept unless ``force``.
    """
    target = Path(target)
    part = _part(target)
    desc = desc or target.name
    if target.exists() and not force:
        logger.info("%s: %s exists, skipping (use force to download again)", desc, target)
        return target
    if force:
        part.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    if part.exists() and size is not None and part.stat().st_size > size:
        part.unlink()

    if drive and part.exists():
        pass  # gdown's finished output from a run stopped before the checks: check it now
    elif not (part.exists() and size is not None and part.stat().st_size == size):
        if drive:
            _gdown(url, part, target, progress)
        else:
            _http_get(url, part, target, desc, progress)
    _verify_and_promote(part, target, url, size, sha256)
    logger.info("%s: saved %s", desc, target)
    return target


def download_sources(root_dir: PathLike, sources: Sequence[WeightFile] = SOURCES, *,
                     base_urls: Optional[Mapping[str, str]] = None, force: bool = False,
                     progress: bool = True) -> dict[str, Optional[DownloadError]]:
    """Download each source to ``root_dir / source.target``; one failure does not stop the rest.

    Returns {name: None on success, else the DownloadError}.
    """
    root = Path(root_dir)
    results: dict[str, Optional[DownloadError]] = {}
    for source in sources:
        url = source.url(base_urls)
        try:
            download_file(url, root / source.target, size=source.size, sha256=source.sha256,
                          force=force, progress=progress, desc=source.name,
                          drive=source.drive_id is not None)
            results[source.name] = None
        except DownloadError as exc:
            logger.error("%s: %s", source.name, exc)
            results[source.name] = exc
    return results


def format_table(sources: Sequence[WeightFile] = SOURCES,
                 base_urls: Optional[Mapping[str, str]] = None) -> str:
    """A plain-text listing of the sources (for ``--list``)."""
    rows = [("name", "target", "source")]
    for s in sources:
        origin = f"gdrive:{s.drive_id}" if s.drive_id else s.url(base_urls)
        rows.append((s.name, s.target, origin))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows)


__all__ = ["DEFAULT_BASE_URLS", "DownloadError", "SOURCES", "download_file",
           "download_sources", "format_table", "resolve_base_urls", "select_sources"]
