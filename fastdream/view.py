"""`fastdream view RUN_DIR_OR_BATCH_DIR`: the report pages served on localhost, updated live.

A small standard-library HTTP server (no extra dependency, nothing to install in a browser) serves the same
page as report.html / index.html, but with links to the files instead of inlined copies and `live` set:
the page polls `api/data` every second and shows new previews, curve points, the mesh and turntables as
the run writes them. It binds to 127.0.0.1 unless --host names another address together with --allow-remote.

Routes: a run folder is served at /, a batch folder's index at / with each run at /run/<folder>/. Under
each page: api/data (the page's data as JSON) and files/<path> (a file of that folder).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import quote, unquote, urlsplit

from .errors import FastDreamError
from .report import VIEWER_JS, index_data, is_run_dir, render_page, run_data

log = logging.getLogger("fastdream")
VIEWER_URL = "/vendor/model-viewer.min.js"


def _file_link(base: Path):
    def link(path: Path) -> str:
        rel = path.relative_to(base).as_posix()
        return "files/" + quote(rel) + f"?v={path.stat().st_mtime_ns}"  # a rewritten file gets a new URL
    return link


class ViewHandler(BaseHTTPRequestHandler):
    server: "ViewServer"

    def log_message(self, fmt, *args):  # the console is for the user, not one line per poll
        log.debug("view: " + fmt, *args)

    def _send(self, status: int, body: bytes, ctype: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _not_found(self) -> None:
        self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = unquote(urlsplit(self.path).path)
        if path == VIEWER_URL:
            return self._send(HTTPStatus.OK, VIEWER_JS.read_bytes(), "text/javascript; charset=utf-8", cache=True)
        folder, rest, is_index = self.server.resolve(path)
        if folder is None:
            return self._not_found()
        if rest in ("", "index.html", "report.html"):
            data = self.server.page_data(folder, is_index)
            return self._send(HTTPStatus.OK, render_page(data, viewer_src=VIEWER_URL).encode(), "text/html; charset=utf-8")
        if rest == "api/data":
            data = self.server.page_data(folder, is_index)
            return self._send(HTTPStatus.OK, json.dumps(data).encode(), "application/json")
        if rest.startswith("files/"):
            target = (folder / rest[len("files/"):]).resolve()
            if folder.resolve() not in target.parents or not target.is_file():
                return self._not_found()
            ctype = mimetypes.guess_type(target.name)[0] or ("model/gltf-binary" if target.suffix == ".glb" else "application/octet-stream")
            try:
                body = target.read_bytes()
            except OSError:
                return self._not_found()
            return self._send(HTTPStatus.OK, body, ctype)
        return self._not_found()


class ViewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root, host: str = "127.0.0.1", port: int = 8765):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FastDreamError(f"{root} is not a folder; pass the output folder of a `fastdream run` or `fastdream batch`.")
        self.is_batch = not is_run_dir(self.root)
        try:
            super().__init__((host, port), ViewHandler)
        except (OSError, OverflowError) as exc:
            raise FastDreamError(f"Cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc}); choose another port with --port.") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def resolve(self, path: str) -> Tuple[Optional[Path], str, bool]:
        """URL path -> (folder whose page it belongs to, the rest of the path, whether that page is the batch index)."""
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            return None, "", False
        if self.is_batch and parts[:1] == ["run"] and len(parts) >= 2:
            folder = self.root / parts[1]
            if not folder.is_dir() or folder.parent != self.root:
                return None, "", False
            return folder, "/".join(parts[2:]), False
        return self.root, "/".join(parts), self.is_batch

    def page_data(self, folder: Path, is_index: bool):
        if is_index:
            data = index_data(folder, run_href=lambda run: f"run/{quote(run.name)}/", link=_file_link(folder), live=True)
        else:
            data = run_data(folder, link=_file_link(folder), live=True)
        return data

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests, notebooks); stop with shutdown()."""
        thread = threading.Thread(target=self.serve_forever, name="fastdream-view", daemon=True)
        thread.start()
        return thread


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
