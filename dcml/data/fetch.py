"""``dcml data fetch``: download a benchmark archive (resumable), check it, unpack it.

Only archives with a stable public address are listed (:data:`ARCHIVES`); the others
(CARS196, In-shop, VehicleID) sit behind forms or drives: docs/datasets.md says where.

The download goes to ``<root>/<file>.part`` and continues from its size with an HTTP
``Range`` request after an interruption (a server that ignores ``Range`` sends the whole
file again, which replaces the part); the finished file is checked against its MD5 (the
checksum the dataset's users have published) before it is renamed to ``<root>/<file>``
and unpacked (torchvision's ``extract_archive``) into a temporary folder that is renamed
to the dataset's folder: a folder that exists is complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from dcml.data.errors import DatasetError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str
    filename: str
    folder: str  # what the archive unpacks to, under the root


ARCHIVES = {
    "cub200": Archive(
        "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
        "97eceeb196236b17998738112f37df78",
        "CUB_200_2011.tgz",
        "CUB_200_2011",
    ),
    "sop": Archive(
        "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
        "7f73d41a2f44250d4779881525aea32e",
        "Stanford_Online_Products.zip",
        "Stanford_Online_Products",
    ),
}

Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)


def archive_for(name: str, url: str | None = None, md5: str | None = None) -> Archive:
    """The listed archive of ``name``, with ``url`` / ``md5`` replaced when given (a mirror)."""
    if name not in ARCHIVES:
        raise DatasetError(f"no download address for {name!r}: fetch knows {sorted(ARCHIVES)} (docs/datasets.md)")
    archive = ARCHIVES[name]
    return replace(archive, url=url or archive.url, md5=(md5 or archive.md5).lower())


def fetch(archive: Archive, root: str | Path, progress: Progress = lambda done, total: None) -> Path:
    """Download (or continue), check and unpack ``archive`` under ``root``; returns the
    dataset folder. Each step is skipped when its result exists."""
    root = Path(root)
    folder = root / archive.folder
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    target = root / archive.filename
    if not target.is_file():
        part = root / (archive.filename + ".part")
        download(archive.url, part, progress)
        digest = md5_of(part)
        if digest != archive.md5:
            bad = part.with_name(part.name + ".bad-md5")
            os.replace(part, bad)
            raise DatasetError(
                f"{archive.url}: the download's MD5 is {digest}, expected {archive.md5}; kept as {bad} "
                "(a changed or damaged file: delete it and fetch again, or give --md5 for a new release)"
            )
        os.replace(part, target)
    elif md5_of(target) != archive.md5:
        raise DatasetError(f"{target} exists but its MD5 is not {archive.md5}: delete it and fetch again")
    _unpack(target, folder)
    return folder


def download(url: str, part: Path, progress: Progress) -> None:
    """``url`` into ``part``, continuing from ``part``'s size when the server supports ranges."""
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            resumed = start and getattr(response, "status", 200) == 206
            if start and not resumed:
                start = 0  # the server sends the whole file
            length = response.headers.get("Content-Length")
            total = start + int(length) if length else None
            with open(part, "ab" if resumed else "wb") as out:
                done = start
                while block := response.read(CHUNK):
                    out.write(block)
                    done += len(block)
                    progress(done, total)
                out.flush()
                os.fsync(out.fileno())
    except urllib.error.HTTPError as error:
        if error.code == 416 and start:  # nothing left to send: the part is complete
            return
        raise DatasetError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        kept = part.stat().st_size if part.exists() else 0
        raise DatasetError(
            f"download of {url} stopped ({error}); rerun the same command to continue from {kept} bytes"
        ) from None
    if total is not None and part.stat().st_size != total:
        raise DatasetError(
            f"download of {url} stopped at {part.stat().st_size} of {total} bytes; rerun the same command to continue"
        )


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _unpack(archive: Path, folder: Path) -> None:
    from torchvision.datasets.utils import extract_archive

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        extract_archive(str(archive), str(tmp))
        unpacked = tmp / folder.name
        if not unpacked.is_dir():
            found = sorted(p.name for p in tmp.iterdir())
            raise DatasetError(f"{archive} does not unpack to {folder.name}/ (it holds {found})")
        os.replace(unpacked, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
