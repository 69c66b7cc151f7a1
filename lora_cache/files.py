"""Where a LoRA file is and which version of it the cache holds (its identity).

The identity decides whether a cached adapter may be served: real path, size, mtime, ctime
and inode, one stat. ctime cannot be set by users, so a rewrite that keeps the size and restores
the mtime is still seen; a file replaced by another (a rename over it) has another inode. No
content hash: one remembered per stat tells nothing the stat does not, one taken at every check
reads the whole file at every queue, and hashing a Flux-sized LoRA once takes about 0.3 s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

import folder_paths

from .errors import LoraCacheError


@dataclass(frozen=True)
class FileIdentity:
    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    def change_from(self, old: FileIdentity) -> str:
        """What differs from `old`, the same file seen earlier, in words."""
        said = []
        if self.size != old.size:
            said.append(f"size {old.size} -> {self.size} bytes")
        if self.mtime_ns != old.mtime_ns:
            said.append(f"modified {_when(old.mtime_ns)} -> {_when(self.mtime_ns)}")
        if self.inode != old.inode:
            said.append("replaced by another file")
        if not said:  # only the ctime: rewritten with its size and modification time restored
            said.append(f"rewritten at {_when(self.ctime_ns)}")
        return ", ".join(said)


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="milliseconds")


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


def _stat(path: str) -> FileIdentity:
    st = os.stat(path)
    return FileIdentity(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def identify(path: str, lora_name: str | None = None) -> FileIdentity:
    try:
        return _stat(path)
    except OSError as e:
        raise LoraCacheError(f"LoRA file '{lora_name or path}' cannot be read: {e.strerror or e}") from e


def unchanged(identity: FileIdentity) -> bool:
    """Cheap re-check (one stat) that the file is still what `identity` describes."""
    try:
        return _stat(identity.path) == identity
    except OSError:
        return False
