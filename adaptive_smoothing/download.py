"""Download the published checkpoints into the layout of docs/METHOD.md, "Published models"
(stdlib urllib only).

Each file goes to ``<target>.part`` first (resumed with an HTTP Range request where the server
honours it) and is renamed onto the target only once it passed the checks: complete, size and
sha256 where known, and torch's magic bytes (zip or pickle), so that a Google Drive HTML page
never ends up where a checkpoint is expected.

Base URLs can be overridden per host, by argument (``base_urls={"gdrive": ...}``) or by the
environment (``ADAPTIVE_SMOOTHING_BASE_URL_GDRIVE=...``; likewise HUGGINGFACE, GCS).
"""
from __future__ import annotations

import hashlib
import html
import http.client
import http.cookiejar
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from tqdm import tqdm

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

DEFAULT_BASE_URLS: dict[str, str] = {
    "gdrive": "https://drive.google.com",
    "huggingface": "https://huggingface.co",
    "gcs": "https://storage.googleapis.com",
}
ENV_PREFIX = "ADAPTIVE_SMOOTHING_BASE_URL_"
CHUNK = 1 << 20
TIMEOUT_S = 60.0
MAX_PAGE_BYTES = 4 << 20
MAX_CONFIRM_HOPS = 3
# torch.save writes a zip archive (torch >= 1.6) or, in the legacy format, a pickle stream.
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


class DownloadError(RuntimeError):
    """A checkpoint could not be fetched or verified; the message names the URL and target."""


@dataclass(frozen=True)
class Source:
    """One published file: where it comes from and where it goes under the model root."""

    name: str
    dataset: str           # cifar10 | cifar100
    model: str             # edm | trades | std (the BiT model shared by both mixers)
    kind: str              # std | rob | mixer
    target: str            # relative to --root-dir, docs/METHOD.md, "Published models"
    host: str              # key of DEFAULT_BASE_URLS
    path: Optional[str] = None      # URL path below the host's base URL
    drive_id: Optional[str] = None  # Google Drive file id (host 'gdrive')
    size: Optional[int] = None
    sha256: Optional[str] = None

    def url(self, base_urls: Optional[Mapping[str, str]] = None) -> str:
        base = resolve_base_urls(base_urls)[self.host].rstrip("/")
        if self.drive_id is not None:
            return f"{base}/uc?export=download&id={urllib.parse.quote(self.drive_id)}"
        assert self.path is not None
        return f"{base}/{self.path.lstrip('/')}"


_HF = "wzekai99/DM-Improves-AT/resolve/main/checkpoint"

# The BiT STD models: the authors serve them from their own server (as cifar10_std_rn152.pt /
# cifar100_std_rn152.pt); we use RobustBench's Drive copies (file 0 of the Bai2023Improving
# entries), whose keys lack the "module." prefix -- the checkpoint loader accepts both.
# Mixers: file 2 of the same RobustBench entries. Sizes and hashes are not published: None.
SOURCES: tuple[Source, ...] = (
    Source("cifar10_std", "cifar10", "std", "std", "Base/cifar10_bit_rn152.tar", "gdrive",
           drive_id="1-5EwY_5tQZudo9idwXiUGr3P4OUUGaQN"),
    Source("cifar100_std", "cifar100", "std", "std", "Base/cifar100_bit_rn152.tar", "gdrive",
           drive_id="12Z63xr4bQwdIvR2w8xvpUnXG1fnUpy5B"),
    Source("cifar10_edm_rob", "cifar10", "edm", "rob", "Base/cifar10_linf_edm_wrn70-16.pt",
           "huggingface", path=f"{_HF}/cifar10_linf_wrn70-16.pt"),
    Source("cifar100_edm_rob", "cifar100", "edm", "rob", "Base/cifar100_linf_edm_wrn70-16.pt",
           "huggingface", path=f"{_HF}/cifar100_linf_wrn70-16.pt"),
    Source("cifar100_trades_rob", "cifar100", "trades", "rob",
           "Base/cifar100_linf_trades_wrn70-16.pt", "gcs",
           path="dm-adversarial-robustness/cifar100_linf_wrn70-16_with.pt"),
    Source("cifar10_edm_mixer", "cifar10", "edm", "mixer", "CompModel/cifar10_edm_best.pt",
           "gdrive", drive_id="1-7oV7QDgz8McvhbaCj6Owx3Rz3daiPrT"),
    Source("cifar100_edm_mixer", "cifar100", "edm", "mixer", "CompModel/cifar100_edm_best.pt",
           "gdrive", drive_id="1--8Jd82Q9ZLlVS_6c1iPrBxqy9sbdAkx"),
    Source("cifar100_trades_mixer", "cifar100", "trades", "mixer",
           "CompModel/cifar100_trades_best.pt", "gdrive",
           drive_id="1-0Sffx4gCIydJc16n1H0k6FYE4kHRnGm"),
)


def resolve_base_urls(overrides: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Defaults, then ``ADAPTIVE_SMOOTHING_BASE_URL_<HOST>`` variables, then ``overrides``."""
    urls = dict(DEFAULT_BASE_URLS)
    for host in DEFAULT_BASE_URLS:
        env = os.environ.get(ENV_PREFIX + host.upper())
        if env:
            urls[host] = env
    for host, url in (overrides or {}).items():
        if host not in DEFAULT_BASE_URLS:
            raise ValueError(f"unknown host {host!r}; expected one of {sorted(DEFAULT_BASE_URLS)}")
        urls[host] = url
    return urls


def select_sources(names: Optional[Iterable[str]] = None, dataset: Optional[str] = None,
                   model: Optional[str] = None,
                   sources: Sequence[Source] = SOURCES) -> list[Source]:
    """Entries by name and/or dataset; ``model`` ('edm'/'trades') picks the three files that
    published model needs (its STD, ROB and mixer)."""
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
        chosen = [s for s in chosen if s.model in (model, "std")]
    return chosen


# ----------------------------------------------------------------------------- HTTP helpers


def _build_opener() -> urllib.request.OpenerDirector:
    # A cookie jar, because older Drive confirmation flows hand the token out as a cookie.
    return urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))


def _looks_like_html(head: bytes, content_type: str) -> bool:
    if "text/html" in content_type.lower():
        return True
    start = head.lstrip()[:15].lower()
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))


def _is_torch_file(head: bytes) -> bool:
    return head.startswith(TORCH_MAGIC)


class _FormParser(HTMLParser):
    """Collects forms (action + hidden inputs) and links of a Drive confirmation page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), {}))
            self._in_form = True
        elif tag == "input" and self._in_form and a.get("name"):
            if a.get("type", "text").lower() == "hidden":
                self.forms[-1][1][a["name"]] = a.get("value", "")
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def drive_confirm_url(page: str, page_url: str,
                      cookies: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The "download anyway" URL of a Google Drive virus-scan warning page, or None.

    Handles the drive.usercontent.google.com form (hidden inputs id/export/confirm/uuid), the
    older ``/uc?export=download&confirm=TOKEN&id=...`` link, and the older still
    ``download_warning_*`` cookie carrying the token.
    """
    parser = _FormParser()
    try:
        parser.feed(page)
    except Exception:  # noqa: BLE001 -- a malformed page just yields no form
        pass
    for action, fields in parser.forms:
        if "confirm" in fields or ("id" in fields and "download" in action):
            return urllib.parse.urljoin(page_url, action) + "?" + urllib.parse.urlencode(fields)
    for href in parser.links:
        if "confirm=" in href:
            return urllib.parse.urljoin(page_url, html.unescape(href))
    match = re.search(r"[?&](?:amp;)?confirm=([0-9A-Za-z_-]+)", page)
    token = match.group(1) if match else next(
        (v for k, v in (cookies or {}).items() if k.startswith("download_warning")), None)
    if token is None:
        return None
    parts = urllib.parse.urlsplit(page_url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query["confirm"] = token
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


@dataclass
class _Html:
    """The server answered with an HTML page (body kept for confirmation-token parsing)."""

    url: str
    text: str


def _fetch_once(opener: urllib.request.OpenerDirector, url: str, part: Path, target: Path,
                expected_size: Optional[int], desc: str, progress: bool) -> Optional[_Html]:
    """One request: append to ``part`` (206) or rewrite it (200). Returns the page if HTML."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "adaptive-smoothing/1.0"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = opener.open(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            total = _total_from_content_range(exc.headers.get("Content-Range", ""))
            exc.close()
            if total == offset:
                logger.info("%s: %s is already complete", desc, part)
                return None
            logger.warning("%s: server refused to resume %s (%d bytes); starting over",
                           desc, part, offset)
            part.unlink()
            return _fetch_once(opener, url, part, target, expected_size, desc, progress)
        exc.close()
        raise DownloadError(f"HTTP {exc.code} {exc.reason} for {url} (target {target})") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {url} (target {target}): {reason}") from exc

    with response:
        final_url = response.geturl()
        content_type = response.headers.get("Content-Type", "")
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header is not None else None
        status = response.status

        if status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range", ""))
            if start != offset:
                raise DownloadError(f"{url} resumed at byte {start}, asked for {offset} "
                                    f"(target {target})")
            mode = "ab"
        else:
            if offset:
                logger.info("%s: server does not resume (HTTP %d); restarting %s",
                            desc, status, part)
            offset, total, mode = 0, length, "wb"
        if total is None:
            total = expected_size

        head = _read_head(response)
        if _looks_like_html(head, content_type):
            body = head + response.read(MAX_PAGE_BYTES)
            return _Html(final_url, body.decode("utf-8", "replace"))
        if mode == "wb" and not _is_torch_file(head):
            raise DownloadError(f"{url} did not return a torch checkpoint (first bytes "
                                f"{head[:8]!r}, Content-Type {content_type!r}); "
                                f"not saved to {target}")

        received = 0
        read_error: Optional[BaseException] = None
        part.parent.mkdir(parents=True, exist_ok=True)
        with open(part, mode) as out, tqdm(total=total, initial=offset, unit="B",
                                           unit_scale=True, unit_divisor=1024, desc=desc,
                                           disable=not progress, leave=False) as bar:
            chunk = head
            try:
                while chunk:
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    chunk = response.read(CHUNK)
            except (http.client.IncompleteRead, OSError) as exc:
                read_error = exc  # what arrived is on disk: keep it for a resume
        if read_error is not None or (length is not None and received < length):
            expected = f"{offset + length}" if length is not None else "an unknown number of"
            why = f" ({read_error})" if read_error is not None else ""
            raise DownloadError(
                f"truncated download from {url}: got {offset + received} of {expected} "
                f"bytes{why}; the partial file is kept at {part}, run again to resume")
    return None


def _read_head(response: http.client.HTTPResponse, n: int = 64) -> bytes:
    head = b""
    while len(head) < n:
        chunk = response.read(n - len(head))
        if not chunk:
            break
        head += chunk
    return head


def _parse_content_range(value: str) -> tuple[Optional[int], Optional[int]]:
    match = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", value.strip())
    if not match:
        return None, None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _total_from_content_range(value: str) -> Optional[int]:
    match = re.search(r"/(\d+)\s*$", value)
    return int(match.group(1)) if match else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(part: Path, target: Path, url: str, size: Optional[int],
            sha256: Optional[str]) -> None:
    """Raise (and drop the .part, which cannot be resumed into anything good) if it is wrong."""
    actual = part.stat().st_size
    with open(part, "rb") as f:
        head = f.read(8)
    problem = None
    if size is not None and actual != size:
        problem = f"size {actual} bytes, expected {size}"
    elif not _is_torch_file(head):
        problem = f"not a torch checkpoint (first bytes {head!r})"
    elif sha256 is not None and _sha256(part) != sha256.lower():
        problem = f"sha256 does not match {sha256}"
    if problem is not None:
        part.unlink()
        raise DownloadError(f"{url}: downloaded file is bad ({problem}); not saved to {target}")


# ----------------------------------------------------------------------------- public API


def download_file(url: str, target: PathLike, *, size: Optional[int] = None,
                  sha256: Optional[str] = None, force: bool = False, progress: bool = True,
                  desc: Optional[str] = None) -> Path:
    """Fetch ``url`` to ``target`` (resumable, verified, atomic); follows Drive confirmations.

    Returns the target path; an existing target is kept unless ``force``.
    """
    target = Path(target)
    part = target.with_name(target.name + ".part")
    desc = desc or target.name
    if target.exists() and not force:
        logger.info("%s: %s exists, skipping (use force to download again)", desc, target)
        return target
    if force:
        part.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    if part.exists() and size is not None and part.stat().st_size > size:
        part.unlink()

    opener = _build_opener()
    cookie_jar = _cookie_jar(opener)
    next_url: Optional[str] = url
    for _ in range(MAX_CONFIRM_HOPS + 1):
        if part.exists() and size is not None and part.stat().st_size == size:
            break  # complete from an earlier run: nothing left to fetch
        page = _fetch_once(opener, next_url, part, target, size, desc, progress)
        if page is None:
            break
        cookies = {c.name: c.value or "" for c in cookie_jar} if cookie_jar else {}
        confirm = drive_confirm_url(page.text, page.url, cookies)
        if confirm is None or confirm == next_url:
            raise DownloadError(
                f"got an HTML page instead of a checkpoint from {url}; Google Drive quota "
                "exceeded or the file is not public? Try again later or download it in a "
                f"browser to {target}. Not saved.")
        logger.info("%s: following the download confirmation page", desc)
        next_url = confirm
    else:
        raise DownloadError(f"{url}: still an HTML page after {MAX_CONFIRM_HOPS} confirmation "
                            f"steps; not saved to {target}")

    _verify(part, target, url, size, sha256)
    os.replace(part, target)
    logger.info("%s: saved %s", desc, target)
    return target


def _cookie_jar(opener: urllib.request.OpenerDirector) -> Optional[http.cookiejar.CookieJar]:
    for handler in opener.handlers:
        if isinstance(handler, urllib.request.HTTPCookieProcessor):
            return handler.cookiejar
    return None


def download_sources(root_dir: PathLike, sources: Sequence[Source] = SOURCES, *,
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
                          force=force, progress=progress, desc=source.name)
            results[source.name] = None
        except DownloadError as exc:
            logger.error("%s: %s", source.name, exc)
            results[source.name] = exc
    return results


def format_table(sources: Sequence[Source] = SOURCES,
                 base_urls: Optional[Mapping[str, str]] = None) -> str:
    """A plain-text listing of the sources (for ``--list``)."""
    rows = [("name", "target", "source")]
    for s in sources:
        origin = f"gdrive:{s.drive_id}" if s.drive_id else s.url(base_urls)
        rows.append((s.name, s.target, origin))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows)


__all__ = ["DEFAULT_BASE_URLS", "DownloadError", "SOURCES", "Source", "download_file",
           "download_sources", "drive_confirm_url", "format_table", "resolve_base_urls",
           "select_sources"]
