"""The adapter store: the LoRAs, textual-inversion embeddings and TAESD that the operator puts in a directory.

Laid out as ComfyUI's `models/` folders are: `loras/`, `embeddings/` and `taesd/` under one root (by default
`adapters/` in the model directory); a file's stem is its name. Every file is read and checked against the model
when it is first seen or changes (safely: `adapter_files`), so the listing shows what is usable and why not; a bad
file is listed with its error and never stops the others. The directory is looked at again at most once a second,
so files added, replaced or removed are picked up without a restart.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapter_files import SUFFIXES, AdapterError
from .params import ADAPTER_NAME, ParamError

log = logging.getLogger(__name__)

FOLDERS = {"loras": "lora", "embeddings": "embedding", "taesd": "taesd"}
RESCAN_SECONDS = 1.0
LISTED_NAMES = 20  # names an unknown-name error offers


@dataclass(frozen=True)
class AdapterFile:
    """One file of the store, as the listing shows it."""
    name: str
    kind: str  # lora | embedding | taesd
    file: str  # relative to the store's root
    size: int
    sha256: str
    rank: int | None = None  # a LoRA's largest rank
    vectors: int | None = None  # an embedding's token slots
    layout: str | None = None  # the key layout a LoRA or TAESD file was written in
    error: str | None = None  # why the file cannot be used; None when it can

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Readers:
    """The model's readers of each kind: they check a file against this model and give what the pipeline uses."""
    lora: Callable[[Path], Any]  # -> lora.LoRA
    embedding: Callable[[Path], Any]  # -> embeddings.Embedding
    taesd: Callable[[Sequence[Path]], Any]  # -> taesd.TinyAutoencoder


@dataclass
class _Entry:
    info: AdapterFile
    stamp: tuple[int, int, int]  # size, mtime_ns, inode: a file replaced or rewritten is read again
    content: Any = None  # embeddings are kept (small); LoRAs go to the LRU below


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class AdapterStore:
    root: Path
    readers: Readers
    max_file_bytes: int = 2**31
    lora_cache_bytes: int = 2**30  # LoRAs kept read in memory (least recently used dropped first)
    _entries: dict[tuple[str, str], _Entry] = field(default_factory=dict)  # (folder, file name) -> entry
    _taesd: tuple[tuple, Any] | None = None  # (the files' stamps, the loaded autoencoder or its error)
    _loras: OrderedDict[str, Any] = field(default_factory=OrderedDict)  # sha256 -> LoRA
    _scanned: float = float("-inf")
    version: int = 0  # grows whenever the store's content changes: cache keys include it

    def refresh(self, force: bool = False) -> None:
        """Reads new and changed files, forgets removed ones (at most once a second unless forced)."""
        now = time.monotonic()
        if not force and now - self._scanned < RESCAN_SECONDS:
            return
        self._scanned = now
        seen: set[tuple[str, str]] = set()
        changed = False
        for folder, kind in FOLDERS.items():
            try:
                files = sorted((e for e in os.scandir(self.root / folder) if e.name.endswith(SUFFIXES)),
                               key=lambda e: e.name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in files:
                key = (folder, entry.name)
                try:
                    stat = entry.stat()  # follows a symlink, as mounted volumes (ConfigMaps) use them
                except OSError:
                    continue
                seen.add(key)
                stamp = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
                known = self._entries.get(key)
                if known is not None and known.stamp == stamp:
                    continue
                self._entries[key] = self._read(folder, kind, Path(entry.path), stamp)
                changed = True
        for key in set(self._entries) - seen:
            del self._entries[key]
            changed = True
        if changed:
            self.version += 1
            log.info("adapter store %s: %s", self.root, ", ".join(
                f"{e.info.kind} {e.info.name}" + (f" (unusable: {e.info.error})" if e.info.error else "")
                for e in self._entries.values()) or "empty")

    def _read(self, folder: str, kind: str, path: Path, stamp: tuple[int, int, int]) -> _Entry:
        name, size = path.stem, stamp[0]
        relative = f"{folder}/{path.name}"

        def unusable(error: str, sha256: str = "") -> _Entry:
            log.warning("adapter file %s unusable: %s", relative, error)
            return _Entry(AdapterFile(name, kind, relative, size, sha256, error=error), stamp)

        if not ADAPTER_NAME.fullmatch(name):
            return unusable(f"{name[:40]!r} is not a usable name (letters, digits, space . _ ( ) + -; 128 at most)")
        if size > self.max_file_bytes:
            return unusable(f"{size} bytes; at most {self.max_file_bytes} allowed (handler.adapters.max_file_bytes)")
        try:
            sha256 = _sha256(path)
        except OSError as err:
            return unusable(f"not readable ({err.strerror})")
        if kind == "taesd":  # read with the folder's other files when first used (`taesd`)
            return _Entry(AdapterFile(name, kind, relative, size, sha256), stamp)
        try:
            content = (self.readers.lora if kind == "lora" else self.readers.embedding)(path)
        except AdapterError as err:
            return unusable(str(err), sha256)
        if kind == "lora":
            self._remember_lora(sha256, content)
            info = AdapterFile(name, kind, relative, size, sha256, rank=content.rank, layout=content.layout)
            return _Entry(info, stamp)
        info = AdapterFile(name, kind, relative, size, sha256, vectors=int(content.vectors.shape[0]))
        return _Entry(info, stamp, content)

    def _remember_lora(self, sha256: str, lora: Any) -> None:
        self._loras[sha256] = lora
        self._loras.move_to_end(sha256)
        while len(self._loras) > 1 and sum(4 * l.parameters for l in self._loras.values()) > self.lora_cache_bytes:
            self._loras.popitem(last=False)

    def listing(self) -> list[dict[str, Any]]:
        """Every file of the store: name, kind, rank (LoRAs), vectors (embeddings), size, sha256, error if unusable."""
        self.refresh()
        try:
            self.taesd()
            taesd_error = None
        except AdapterError as err:
            taesd_error = str(err)
        return [{**e.info.describe(), **({"error": taesd_error} if taesd_error and e.info.kind == "taesd" else {})}
                for e in sorted(self._entries.values(), key=lambda e: (e.info.kind, e.info.name))]

    def _of_kind(self, kind: str) -> dict[str, _Entry]:
        return {e.info.name: e for e in self._entries.values() if e.info.kind == kind}

    def lora(self, name: str) -> tuple[Any, AdapterFile]:
        """The LoRA of that name and its listing entry, or a ParamError naming the `loras` field."""
        entry = self._of_kind("lora").get(name)
        if entry is None:
            names = sorted(self._of_kind("lora"))
            offer = ", ".join(names[:LISTED_NAMES]) + (" ..." if len(names) > LISTED_NAMES else "")
            raise ParamError("loras", f"no LoRA named {name!r} in the adapter store; there are: {offer or 'none'}")
        if entry.info.error:
            raise ParamError("loras", f"{name}: the file {entry.info.file} is unusable: {entry.info.error}")
        lora = self._loras.get(entry.info.sha256)
        if lora is None:  # dropped from memory: read again (it was checked when listed)
            try:
                lora = self.readers.lora(self.root / entry.info.file)
            except (AdapterError, OSError) as err:
                raise ParamError("loras", f"{name}: the file {entry.info.file} is unusable: {err}") from None
        self._remember_lora(entry.info.sha256, lora)
        return lora, entry.info

    def embeddings(self) -> dict[str, tuple[Any, AdapterFile]]:
        """Every usable embedding by name (a prompt uses one by writing its name, as in AUTOMATIC1111)."""
        return {name: (e.content, e.info) for name, e in self._of_kind("embedding").items() if not e.info.error}

    def taesd(self) -> tuple[Any, list[AdapterFile]] | None:
        """The store's tiny autoencoder (all the files of `taesd/` together: a decoder, maybe an encoder) and its
        files; None when the folder is empty; an AdapterError when its files make no usable TAESD."""
        files = sorted(self._of_kind("taesd").values(), key=lambda e: e.info.name)
        if not files:
            return None
        stamps = tuple((e.info.file, e.stamp) for e in files)
        if self._taesd is None or self._taesd[0] != stamps:
            try:
                loaded: Any = self.readers.taesd([self.root / e.info.file for e in files])
            except AdapterError as err:
                loaded = err
            self._taesd = (stamps, loaded)
        loaded = self._taesd[1]
        if isinstance(loaded, AdapterError):
            raise loaded
        return loaded, [e.info for e in files]
