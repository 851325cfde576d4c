"""dcml data fetch against a local HTTP server serving a miniature CUB archive: an
interrupted download continues with a Range request, the MD5 is checked, the archive is
unpacked and inspected (the real download code; no network)."""

from __future__ import annotations

import hashlib
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dcml.data.errors import DatasetError
from dcml.data.fetch import archive_for
from flows.cli import main
from tests.data.fake_benchmarks import make_cub200


class ArchiveServer:
    """Serves ``payload`` at ``/CUB_200_2011.tgz`` with Range support; the first
    ``cut_first`` responses stop after half the bytes (a dropped connection)."""

    def __init__(self, payload: bytes, cut_first: int = 0) -> None:
        self.payload, self.cut_first, self.ranges = payload, cut_first, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                start = 0
                header = self.headers.get("Range")
                server.ranges.append(header)
                if header:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                body = server.payload[start:]
                self.send_response(206 if header else 200)
                self.send_header("Content-Length", str(len(body)))
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                self.end_headers()
                if server.cut_first > 0:
                    server.cut_first -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-way
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/CUB_200_2011.tgz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("cub")
    make_cub200(folder / "CUB_200_2011", images_per_class=2)
    path = folder / "CUB_200_2011.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder / "CUB_200_2011", arcname="CUB_200_2011")
    return path.read_bytes()


def test_interrupted_download_continues_then_unpacks_and_inspects(archive, tmp_path, capsys):
    server = ArchiveServer(archive, cut_first=1)
    md5 = hashlib.md5(archive).hexdigest()
    args = ["data", "fetch", "cub200", "--root", str(tmp_path), "--url", server.url, "--md5", md5]
    try:
        assert main(args) == 2  # the connection dropped: a clear message, the part kept
        assert "rerun the same command to continue" in capsys.readouterr().err
        part = tmp_path / "CUB_200_2011.tgz.part"
        assert 0 < part.stat().st_size < len(archive)
        assert main(args) == 0
    finally:
        server.close()
    assert server.ranges == [None, f"bytes={len(archive) // 2}-"]  # the second request continued
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["train"]["classes"] == 100 and report["splits"]["test"]["images"] == 200
    assert (tmp_path / "CUB_200_2011.tgz").read_bytes() == archive and not part.exists()
    assert (tmp_path / "CUB_200_2011" / "images.txt").is_file()


def test_wrong_checksum_is_refused_and_nothing_unpacked(archive, tmp_path, capsys):
    server = ArchiveServer(archive)
    try:
        code = main(["data", "fetch", "cub200", "--root", str(tmp_path), "--url", server.url, "--md5", "0" * 32])
    finally:
        server.close()
    assert code == 2
    error = capsys.readouterr().err
    assert "MD5" in error and server.url in error
    assert not (tmp_path / "CUB_200_2011").exists() and not (tmp_path / "CUB_200_2011.tgz").exists()


def test_listed_archives_and_unknown_name():
    assert archive_for("cub200").url.startswith("https://") and len(archive_for("sop").md5) == 32
    with pytest.raises(DatasetError, match="cars196"):
        archive_for("cars196")
