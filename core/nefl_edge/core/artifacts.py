"""Artifacts on disk: reading and verifying a manifest, and the device's content-addressed cache. A submodel's
files are named by their :class:`~nefl_edge.core.schemas.ArtifactRole`."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Optional

from pydantic import ValidationError

from nefl_edge.core.errors import BadInput
from nefl_edge.core.schemas import ArtifactRole, FileEntry, Manifest, SubmodelEntry

MANIFEST_NAME = "manifest.json"


class ArtifactError(BadInput):
    """An artifact folder or file that is missing, unreadable or tampered with."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, name: str) -> FileEntry:
    return FileEntry(name=name, sha256=file_sha256(path), size=Path(path).stat().st_size)


def parse_manifest(text: str, where: str) -> Manifest:
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ArtifactError(
            f"{where} is not a valid manifest: {'.'.join(map(str, first['loc']))}: {first['msg']}"
        ) from None


def load_manifest(folder: Path, verify: bool = True) -> Manifest:
    """Read ``folder/manifest.json``; with ``verify`` check every file's size and sha256."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{folder} has no {MANIFEST_NAME}; export artifacts with `nefl-coord export --out {folder}`"
        )
    manifest = parse_manifest(path.read_text(), str(path))
    if verify:
        for sub in manifest.submodels:
            submodel_paths(Path(folder), sub)
    return manifest


def submodel_paths(
    folder: Path, sub: SubmodelEntry, roles: Optional[Iterable[ArtifactRole]] = None
) -> Dict[ArtifactRole, Path]:
    """Paths of a submodel's files (all, or those of ``roles``) in an export folder, each checked against
    its hash."""
    out: Dict[ArtifactRole, Path] = {}
    for role, entry in sub.files.items():
        if roles is not None and role not in roles:
            continue
        path = Path(folder) / entry.name
        if not path.is_file():
            raise ArtifactError(f"artifact {path} is missing; re-run the export")
        if path.stat().st_size != entry.size or file_sha256(path) != entry.sha256:
            raise ArtifactError(f"artifact {path} does not match its sha256 in the manifest (corrupt or tampered)")
        out[role] = path
    return out


class ArtifactCache:
    """Files stored by their sha256 under one folder, so that a device fetches each artifact once."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.folder / digest

    def has(self, digest: str) -> bool:
        path = self.path(digest)
        if not path.is_file():
            return False
        if file_sha256(path) != digest:
            path.unlink()
            return False
        return True

    def put(self, data: bytes, digest: str) -> Path:
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactError(f"artifact {digest[:12]} arrived with a different sha256; not cached")
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".part-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, self.path(digest))
        return self.path(digest)

    def submodel_paths(self, sub: SubmodelEntry, roles: Iterable[ArtifactRole]) -> Optional[Dict[ArtifactRole, Path]]:
        """The cached files of a submodel for ``roles``, or ``None`` if any is missing."""
        wanted = {role: f for role, f in sub.files.items() if role in roles}
        if all(self.has(f.sha256) for f in wanted.values()):
            return {role: self.path(f.sha256) for role, f in wanted.items()}
        return None
