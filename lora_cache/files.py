"""Where a LoRA file is and what exactly it holds (its identity).

The identity decides whether a cached adapter may be served: real path, size, mtime and
ctime, inode and a content hash. ctime cannot be set by users, so a rewrite that keeps the
size and restores the mtime is still seen. The hash is recomputed only when the stat changes.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass

import folder_paths

from .errors import LoraCacheError

_HASH_CHUNK = 1 << 20
_digests: OrderedDict[tuple, str] = OrderedDict()
_DIGESTS_KEPT = 256


@dataclass(frozen=True)
class FileIdentity:
    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    sha256: str

    def describe(self) -> str:
        return f"sha256 {self.sha256[:12]}, {self.size} bytes"


def _escapes(lora_name: str) -> str | None:
    """Why `lora_name` is not a plain name relative to a loras folder, or None.

    ComfyUI's get_full_path silently re-roots '../x' and '/abs/x' inside each folder; a name
    like that never comes from the file list, so it is refused rather than reinterpreted."""
    if "\x00" in lora_name:
        return "contains a NUL character"
    if os.path.isabs(lora_name) or lora_name.startswith(("/", "\\")) or (os.name == "nt" and lora_name[1:2] == ":"):
        return "is an absolute path"
    if ".." in lora_name.replace("\\", "/").split("/"):
        return "contains '..'"
    return None


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def resolve(lora_name: str) -> str:
    """The real path of `lora_name` inside ComfyUI's loras folders.

    Refuses names that escape the folders and files whose real path (after symlinks) lies
    outside every loras folder: a request may only name what the loras list offers."""
    if not isinstance(lora_name, str) or not lora_name:
        raise LoraCacheError(f"LoRA name {lora_name!r} is not a file name")
    why = _escapes(lora_name)
    if why is not None:
        raise LoraCacheError(f"LoRA name {lora_name!r} is refused: it {why}; give a name from the "
                             f"loras folders' list")
    path = folder_paths.get_full_path("loras", lora_name)
    folders = folder_paths.get_folder_paths("loras")
    if path is None:
        raise LoraCacheError(f"LoRA file '{lora_name}' not found in the loras folders ({', '.join(folders)})")
    real = os.path.realpath(path)
    if not any(_inside(real, os.path.realpath(f)) for f in folders):
        raise LoraCacheError(
            f"LoRA file '{lora_name}' is refused: it resolves to {real}, outside every loras folder "
            f"(a symlink out); put the file in a loras folder or add its folder to ComfyUI's "
            f"extra_model_paths.yaml")
    return real


def _stat_key(path: str) -> tuple:
    st = os.stat(path)
    return (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def identify(path: str, lora_name: str | None = None) -> FileIdentity:
    try:
        key = _stat_key(path)
        digest = _digests.get(key)
        if digest is None:
            digest = _sha256(path)
            if _stat_key(path) != key:  # written while we read it: trust neither
                raise LoraCacheError(f"LoRA file '{lora_name or path}' changed while it was being read")
            _digests[key] = digest
            while len(_digests) > _DIGESTS_KEPT:
                _digests.popitem(last=False)
        else:
            _digests.move_to_end(key)
    except OSError as e:
        raise LoraCacheError(f"LoRA file '{lora_name or path}' cannot be read: {e.strerror or e}") from e
    return FileIdentity(path, key[1], key[2], key[3], key[4], digest)


def unchanged(identity: FileIdentity) -> bool:
    """Cheap re-check (one stat) that the file is still what `identity` describes."""
    try:
        return _stat_key(identity.path) == (identity.path, identity.size, identity.mtime_ns,
                                            identity.ctime_ns, identity.inode)
    except OSError:
        return False
