"""Checkpoint downloads against a local HTTP server (127.0.0.1, port 0)."""
from __future__ import annotations

import gzip
import importlib.util
import io
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
import torch

from adaptive_smoothing import download as dl
from adaptive_smoothing.download import DownloadError
from adaptive_smoothing.published import WeightFile

REPO_ROOT = Path(__file__).resolve().parents[1]

Route = Callable[["_Handler", dict], None]


@dataclass
class _Request:
    path: str
    query: dict
    range: Optional[str]
    sent: int = 0


@dataclass
class _State:
    routes: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)
    url: str = ""


class _Handler(BaseHTTPRequestHandler):
    state: _State  # set per server

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        self.record = _Request(parts.path, query, self.headers.get("Range"))
        self.state.requests.append(self.record)
        route = self.state.routes.get(parts.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        route(self, query)

    def send_body(self, body: bytes, status: int = 200,
                  content_type: str = "application/octet-stream", headers: Optional[dict] = None,
                  declared_length: Optional[int] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if declared_length is None
                                               else declared_length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        # Counted before writing: the client may finish reading, and the test check the count,
        # before this thread runs again (a failed write raises, so the count is not overstated).
        self.record.sent += len(body)
        self.wfile.write(body)


def serve_file(data: bytes, honour_range: bool = True,
               filename: Optional[str] = None) -> Route:
    # Drive names the file in Content-Disposition; gdown takes a Drive answer without it for a
    # confirmation page.
    extra = {"Content-Disposition": f'attachment; filename="{filename}"'} if filename else {}

    def route(h: _Handler, query: dict) -> None:
        rng = h.headers.get("Range")
        if honour_range and rng and rng.startswith("bytes="):
            start = int(rng[len("bytes="):].split("-")[0])
            if start >= len(data):
                h.send_body(b"", 416, headers={"Content-Range": f"bytes */{len(data)}"})
                return
            h.send_body(data[start:], 206, headers={
                "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}",
                "Accept-Ranges": "bytes", **extra})
            return
        h.send_body(data, headers=extra)
    return route


def serve_truncated(data: bytes, keep: int) -> Route:
    def route(h: _Handler, query: dict) -> None:
        # The connection always breaks at byte ``keep`` of the file: announce the rest, send up
        # to ``keep``, then let the server close the connection. (A client that retries at once,
        # as huggingface_hub does, gets nothing more from a Range request.)
        rng = h.headers.get("Range")
        start = int(rng[len("bytes="):].split("-")[0]) if rng else 0
        headers = ({"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
                   if start else None)
        h.send_body(data[start:keep], 206 if start else 200, headers=headers,
                    declared_length=len(data) - start)
    return route


def serve_html(text: str) -> Route:
    def route(h: _Handler, query: dict) -> None:
        h.send_body(text.encode(), content_type="text/html; charset=utf-8")
    return route


def redirect(location: str) -> Route:
    def route(h: _Handler, query: dict) -> None:
        h.send_response(303)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


@pytest.fixture
def server() -> Iterator[_State]:
    state = _State()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()


@pytest.fixture
def checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.arange(20000, dtype=torch.float32)}, "epoch": 3}, buffer)
    return buffer.getvalue()


def _no_leftovers(target: Path) -> None:
    assert not target.exists()
    assert not target.with_name(target.name + ".part").exists()
    assert not list(target.parent.glob(target.name + ".part*"))  # gdown's temporary files


DRIVE = "http://drive.google.com"


@pytest.fixture
def as_google_drive(server: _State, monkeypatch: pytest.MonkeyPatch) -> str:
    """The local server answers for drive.google.com, as an HTTP proxy, so that gdown takes the
    URL for Drive's and follows its confirmation pages (it does so for Google's hosts only)."""
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, server.url)
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return DRIVE


# ----------------------------------------------------------------------------- plain files


def test_good_file_lands_at_target(server: _State, checkpoint_bytes: bytes, tmp_path: Path) -> None:
    server.routes["/ckpt.pt"] = serve_file(checkpoint_bytes)
    target = tmp_path / "Base" / "x.pt"
    assert dl.download_file(f"{server.url}/ckpt.pt", target, progress=False) == target
    assert target.read_bytes() == checkpoint_bytes
    assert not target.with_name("x.pt.part").exists()
    loaded = torch.load(target, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(20000.0))

    # An existing target is kept without a request; force fetches it again.
    n = len(server.requests)
    dl.download_file(f"{server.url}/ckpt.pt", target, progress=False)
    assert len(server.requests) == n
    dl.download_file(f"{server.url}/ckpt.pt", target, progress=False, force=True)
    assert len(server.requests) == n + 1


def test_404_names_url_and_target(server: _State, tmp_path: Path) -> None:
    target = tmp_path / "missing.pt"
    with pytest.raises(DownloadError, match="404") as info:
        dl.download_file(f"{server.url}/nothing.pt", target, progress=False)
    assert f"{server.url}/nothing.pt" in str(info.value) and str(target) in str(info.value)
    _no_leftovers(target)


def test_unreachable_server(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="cannot reach"):
        dl.download_file(f"http://127.0.0.1:{port}/x.pt", tmp_path / "x.pt", progress=False)
    _no_leftovers(tmp_path / "x.pt")


def test_html_instead_of_checkpoint(server: _State, tmp_path: Path) -> None:
    server.routes["/quota"] = serve_html(
        "<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head>"
        "<body>Too many users have viewed or downloaded this file recently.</body></html>")
    target = tmp_path / "CompModel" / "m.pt"
    with pytest.raises(DownloadError, match="got an HTML page instead of a checkpoint") as info:
        dl.download_file(f"{server.url}/quota", target, progress=False)
    assert f"{server.url}/quota" in str(info.value) and "quota" in str(info.value).lower()
    _no_leftovers(target)


def test_non_torch_bytes_rejected(server: _State, tmp_path: Path) -> None:
    server.routes["/blob"] = serve_file(gzip.compress(b"not a checkpoint" * 100))
    target = tmp_path / "m.pt"
    with pytest.raises(DownloadError, match="not .*torch checkpoint|did not return a torch"):
        dl.download_file(f"{server.url}/blob", target, progress=False)
    _no_leftovers(target)


def test_size_and_sha256_checked(server: _State, checkpoint_bytes: bytes, tmp_path: Path) -> None:
    import hashlib

    server.routes["/ckpt.pt"] = serve_file(checkpoint_bytes)
    target = tmp_path / "m.pt"
    with pytest.raises(DownloadError, match="sha256"):
        dl.download_file(f"{server.url}/ckpt.pt", target, sha256="0" * 64, progress=False)
    _no_leftovers(target)
    with pytest.raises(DownloadError, match="size"):
        dl.download_file(f"{server.url}/ckpt.pt", target, size=len(checkpoint_bytes) + 1,
                         progress=False)
    _no_leftovers(target)
    good = hashlib.sha256(checkpoint_bytes).hexdigest()
    dl.download_file(f"{server.url}/ckpt.pt", target, size=len(checkpoint_bytes), sha256=good,
                     progress=False)
    assert target.read_bytes() == checkpoint_bytes


# ----------------------------------------------------------------------------- truncation, resume


def test_truncated_download_keeps_part_then_resumes(server: _State, checkpoint_bytes: bytes,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # huggingface_hub writes whole chunks (10 MiB): what arrived of a chunk the connection broke
    # in is fetched again. Small chunks let an 80 kB file stand for a large one.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    keep = 4096 * (len(checkpoint_bytes) // 3 // 4096)
    server.routes["/ckpt.pt"] = serve_truncated(checkpoint_bytes, keep)
    target = tmp_path / "Base" / "rob.pt"
    part = target.with_name("rob.pt.part")
    with pytest.raises(DownloadError, match="truncated") as info:
        dl.download_file(f"{server.url}/ckpt.pt", target, progress=False)
    assert str(part) in str(info.value)
    assert not target.exists()
    assert part.read_bytes() == checkpoint_bytes[:keep]

    server.routes["/ckpt.pt"] = serve_file(checkpoint_bytes)
    dl.download_file(f"{server.url}/ckpt.pt", target, progress=False)
    assert target.read_bytes() == checkpoint_bytes
    assert not part.exists()
    assert server.requests[-1].range == f"bytes={keep}-"
    assert server.requests[-1].sent == len(checkpoint_bytes) - keep


def test_range_resume_fetches_only_the_rest(server: _State, checkpoint_bytes: bytes,
                                            tmp_path: Path) -> None:
    server.routes["/ckpt.pt"] = serve_file(checkpoint_bytes)
    target = tmp_path / "m.pt"
    done = 40000
    target.with_name("m.pt.part").write_bytes(checkpoint_bytes[:done])
    dl.download_file(f"{server.url}/ckpt.pt", target, progress=False)
    assert target.read_bytes() == checkpoint_bytes
    [request] = server.requests
    assert request.range == f"bytes={done}-"
    assert request.sent == len(checkpoint_bytes) - done


def test_server_without_range_restarts(server: _State, checkpoint_bytes: bytes,
                                       tmp_path: Path) -> None:
    server.routes["/ckpt.pt"] = serve_file(checkpoint_bytes, honour_range=False)
    target = tmp_path / "m.pt"
    target.with_name("m.pt.part").write_bytes(b"garbage that must not stay in front")
    dl.download_file(f"{server.url}/ckpt.pt", target, progress=False)
    assert target.read_bytes() == checkpoint_bytes


def test_complete_part_is_not_fetched_again(server: _State, checkpoint_bytes: bytes,
                                            tmp_path: Path) -> None:
    # The .part already holds the whole file: the server answers 416 and we only verify.
    server.routes["/ckpt.pt"] = serve_file(checkpoint_bytes)
    target = tmp_path / "m.pt"
    target.with_name("m.pt.part").write_bytes(checkpoint_bytes)
    dl.download_file(f"{server.url}/ckpt.pt", target, progress=False)
    assert target.read_bytes() == checkpoint_bytes
    assert sum(r.sent for r in server.requests) == 0


# ----------------------------------------------------------------------------- Google Drive


def test_drive_usercontent_form_flow(server: _State, checkpoint_bytes: bytes,
                                     tmp_path: Path, as_google_drive: str) -> None:
    file_id = "1-abc_DEF"
    form = (
        "<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
        "<p>Google Drive can't scan this file for viruses.</p>"
        f'<form id="download-form" action="{server.url}/download" method="get">'
        '<input type="submit" id="uc-download-link" value="Download anyway"/>'
        f'<input type="hidden" name="id" value="{file_id}">'
        '<input type="hidden" name="export" value="download">'
        '<input type="hidden" name="confirm" value="t">'
        '<input type="hidden" name="uuid" value="1234-abcd"></form></body></html>')

    def usercontent(h: _Handler, query: dict) -> None:
        if query.get("confirm") == "t" and query.get("uuid") == "1234-abcd" \
                and query.get("id") == file_id:
            serve_file(checkpoint_bytes, filename="cifar10_edm_best.pt")(h, query)
        else:
            serve_html(form)(h, query)

    server.routes["/uc"] = redirect(f"/download?id={file_id}&export=download")
    server.routes["/download"] = usercontent
    source = WeightFile("cifar10_edm_mixer", "cifar10", "edm", "mixer",
                    "CompModel/cifar10_edm_best.pt", "gdrive", drive_id=file_id)
    results = dl.download_sources(tmp_path, [source], base_urls={"gdrive": as_google_drive},
                                  progress=False)
    assert results == {"cifar10_edm_mixer": None}
    target = tmp_path / "CompModel" / "cifar10_edm_best.pt"
    assert target.read_bytes() == checkpoint_bytes
    assert [r.path for r in server.requests] == ["/uc", "/download", "/download"]


def test_drive_download_broken_off_resumes_with_gdown(server: _State, tmp_path: Path,
                                                     as_google_drive: str) -> None:
    buffer = io.BytesIO()  # larger than two of gdown's 512 kB chunks: whole chunks are kept
    torch.save({"w": torch.arange(400_000, dtype=torch.float32)}, buffer)
    data = buffer.getvalue()
    keep = 1_200_000
    disposition = {"Content-Disposition": 'attachment; filename="cifar10_bit_rn152.tar"'}

    def broken(h: _Handler, query: dict) -> None:
        h.send_body(data[:keep], headers=disposition, declared_length=len(data))

    server.routes["/uc"] = broken
    source = WeightFile("cifar10_std", "cifar10", "std", "std", "Base/cifar10_bit_rn152.tar",
                    "gdrive", drive_id="1-5E")
    target = tmp_path / "Base" / "cifar10_bit_rn152.tar"
    [error] = dl.download_sources(tmp_path, [source], base_urls={"gdrive": as_google_drive},
                                  progress=False).values()
    assert isinstance(error, DownloadError) and "truncated" in str(error)
    assert str(target) + ".part" in str(error)
    [partial] = target.parent.glob("cifar10_bit_rn152.tar.part*tmp")
    kept = partial.stat().st_size
    assert 0 < kept <= keep and partial.read_bytes() == data[:kept]
    assert not target.exists()

    server.routes["/uc"] = serve_file(data, filename="cifar10_bit_rn152.tar")
    assert dl.download_sources(tmp_path, [source], base_urls={"gdrive": as_google_drive},
                               progress=False) == {"cifar10_std": None}
    assert target.read_bytes() == data
    assert server.requests[-1].range == f"bytes={kept}-"
    assert not list(target.parent.glob("*.part*"))


@pytest.mark.parametrize("as_drive", [True, False], ids=["drive-host", "other-host"])
def test_drive_quota_page_is_reported_not_saved(server: _State, tmp_path: Path, as_drive: bool,
                                                request: pytest.FixtureRequest) -> None:
    # As Drive's host gdown finds no confirmation link; elsewhere it saves the page, which the
    # check refuses.
    base = request.getfixturevalue("as_google_drive") if as_drive else server.url
    server.routes["/uc"] = serve_html("<html><body>Sorry, you can't view or download this file "
                                      "at this time.</body></html>")
    source = WeightFile("cifar100_trades_mixer", "cifar100", "trades", "mixer",
                    "CompModel/cifar100_trades_best.pt", "gdrive", drive_id="1-0S")
    results = dl.download_sources(tmp_path, [source], base_urls={"gdrive": base},
                                  progress=False)
    error = results["cifar100_trades_mixer"]
    assert isinstance(error, DownloadError)
    assert "got an HTML page instead of a checkpoint" in str(error)
    assert "id=1-0S" in str(error)
    _no_leftovers(tmp_path / "CompModel" / "cifar100_trades_best.pt")


# ----------------------------------------------------------------------------- table, CLI


def test_source_table_matches_layout() -> None:
    targets = {s.target for s in dl.SOURCES}
    assert targets == {
        "Base/cifar10_bit_rn152.tar", "Base/cifar100_bit_rn152.tar",
        "Base/cifar10_linf_edm_wrn70-16.pt", "Base/cifar100_linf_edm_wrn70-16.pt",
        "Base/cifar100_linf_trades_wrn70-16.pt", "CompModel/cifar10_edm_best.pt",
        "CompModel/cifar100_edm_best.pt", "CompModel/cifar100_trades_best.pt",
        "Base/Peng2023Robust.pt"}  # MixedNUTS's CIFAR-10 ROB; its other files are shared
    assert len({s.name for s in dl.SOURCES}) == len(dl.SOURCES)
    needed = dl.select_sources(dataset="CIFAR-100", model="trades")
    assert {s.kind for s in needed} == {"std", "rob", "mixer"}
    nuts = dl.select_sources(model="mixednuts")  # no mixer; the CIFAR-100 ROB is EDM's file
    assert {s.name for s in nuts} == {"cifar10_std", "cifar10_peng2023robust_rob",
                                      "cifar100_std", "cifar100_edm_rob"}
    with pytest.raises(ValueError, match="unknown checkpoint"):
        dl.select_sources(["nope"])


def test_base_url_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTIVE_SMOOTHING_BASE_URL_HUGGINGFACE", "http://127.0.0.1:9")
    [source] = dl.select_sources(["cifar10_edm_rob"])
    assert source.url() == ("http://127.0.0.1:9/wzekai99/DM-Improves-AT/resolve/main/"
                            "checkpoint/cifar10_linf_wrn70-16.pt")
    assert source.url({"huggingface": "http://h"}).startswith("http://h/wzekai99/")


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "download_models_script", REPO_ROOT / "scripts" / "download_models.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_cli_downloads_dataset_into_layout(server: _State, checkpoint_bytes: bytes,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    cifar10 = dl.select_sources(dataset="cifar10")
    drive_ids = {s.drive_id for s in cifar10 if s.drive_id}

    def uc(h: _Handler, query: dict) -> None:
        if query.get("id") in drive_ids:
            serve_file(checkpoint_bytes)(h, query)
        else:
            h.send_error(404)

    server.routes["/uc"] = uc
    for s in cifar10:
        if not s.drive_id:
            server.routes[urllib.parse.urlsplit(s.url()).path] = serve_file(checkpoint_bytes)
    monkeypatch.setenv("ADAPTIVE_SMOOTHING_BASE_URL_GDRIVE", server.url)
    monkeypatch.setenv("ADAPTIVE_SMOOTHING_BASE_URL_HUGGINGFACE", server.url)
    monkeypatch.setenv("ADAPTIVE_SMOOTHING_BASE_URL_GCS", server.url)  # no route there: 404

    script = _load_script()
    runner = CliRunner()
    listing = runner.invoke(script.main, ["--list", "--dataset", "cifar10"])
    assert listing.exit_code == 0, listing.output
    assert "cifar10_edm_mixer" in listing.output and "cifar100" not in listing.output

    result = runner.invoke(script.main, ["--root-dir", str(tmp_path), "--dataset", "cifar10",
                                         "--no-progress"])
    assert result.exit_code == 0, result.output
    for rel in ("Base/cifar10_bit_rn152.tar", "Base/cifar10_linf_edm_wrn70-16.pt",
                "CompModel/cifar10_edm_best.pt"):
        assert (tmp_path / rel).read_bytes() == checkpoint_bytes

    # A failing entry makes the command fail, after trying the others.
    result = runner.invoke(script.main, ["--root-dir", str(tmp_path / "other"),
                                         "--only", "cifar100_trades_rob", "--no-progress"])
    assert result.exit_code == 1
    assert "cifar100_trades_rob" in result.output
