"""On-disk persistence of prefix-cache checkpoints (``--cache-dir``), kept apart from the
in-memory store in server/cache.py.

A KV file steers the model: whoever can plant one for Claude Code's (public) system prompt
decides what the model "read" before the user's turn. So nothing here is trusted:

- **A private directory.** It is created 0700 and its files 0600. A directory that is group- or
  world-writable, owned by another user, or reached through a parent that another user can
  rewrite (writable without the sticky bit, or owned by someone other than us or root) is
  refused with :class:`CacheDirError`; the server reports it at start-up and exits. A directory
  we own that others can only read (older warmturn versions made it 0755) is tightened to 0700.
- **A content digest.** Each file's metadata carries a SHA-256 over the format tag, the model
  id, the token list, every tensor (name, dtype, shape, bytes), the scalars of the cache state
  and the cache classes. On load it is recomputed from the tensors as read, before anything is used:
  a scaled, zeroed or otherwise edited K/V tensor no longer matches and the file is ignored with
  a warning. The digest catches corruption and edits that do not recompute it; keeping other
  users out is the directory's job (a writer who can recompute the digest could write the
  directory, which the checks above refuse).
- Format, model id, token list, cache layout and head shapes are checked as before; a file not
  owned by us, writable by others, or not a regular file is skipped.
- Files are written under a new temporary name (``.NAME.RANDOM.PID.tmp.safetensors``, created
  with ``O_EXCL``, so never through a planted symlink) and renamed; the
  temporary files a killed process left behind are removed at start-up.
- A byte budget: when a write goes over it, the least recently used files (mtime, refreshed on
  load) are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import (
    KVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)

from warmturn.prefix import common_prefix_len
from warmturn.server.kvfamily import fed_tokens

log = logging.getLogger(__name__)

FILE_FORMAT = "warmturn-prefix-2"  # -2: adds the content digest; -1 files are refused (no digest)
_FILE_RE = re.compile(r"^(?P<model>[0-9a-f]{16})-(?P<n>\d+)-(?P<hash>[0-9a-f]{32})\.safetensors$")
_TMP_RE = re.compile(r"^\..+\.(?P<pid>\d+)\.tmp\.safetensors$")


class CacheDirError(ValueError):
    """The cache directory is not private to this user: refuse to read or write it."""


def token_hash(tokens: Sequence[int] | np.ndarray) -> str:
    """Stable 32-hex digest of a token sequence (int32 little-endian bytes)."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# The private directory
# ---------------------------------------------------------------------------------------------


def _describe(st: os.stat_result) -> str:
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}"


def _check_ancestors(path: Path, uid: int) -> None:
    """Every parent of `path` must be owned by us or root, and not writable by others unless
    sticky (/tmp): otherwise another user could rename our directory away and put theirs."""
    for parent in path.parents:
        st = parent.stat()
        if st.st_uid not in (uid, 0):
            raise CacheDirError(f"cache directory {path}: parent {parent} is owned by another user "
                                f"({_describe(st)})")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise CacheDirError(f"cache directory {path}: parent {parent} is writable by other users "
                                f"without the sticky bit ({_describe(st)})")


def ensure_private_dir(directory: str | os.PathLike[str]) -> Path:
    """Create `directory` (0700) or check an existing one; return its resolved path.

    Raises :class:`CacheDirError` when it is not a directory, is owned by another user, is
    group- or world-writable, or sits under a parent other users can rewrite."""
    path = Path(directory).expanduser()
    uid = os.geteuid()
    if not path.exists():
        try:
            path.mkdir(parents=True, mode=0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise CacheDirError(f"cannot create cache directory {path}: {e.strerror or e}") from e
    path = path.resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise CacheDirError(f"cache directory {path}: {e.strerror or e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"cache directory {path} is not a directory")
    if st.st_uid != uid:
        raise CacheDirError(f"cache directory {path} is owned by another user ({_describe(st)}); "
                            f"use a directory of your own, e.g. ~/.cache/warmturn/kv")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheDirError(f"cache directory {path} is writable by other users ({_describe(st)}): "
                            f"anyone who can write it can plant KV state that steers the model. "
                            f"Use a private directory (chmod 700) such as ~/.cache/warmturn/kv")
    _check_ancestors(path, uid)
    if stat.S_IMODE(st.st_mode) & 0o077:
        log.warning("prefix cache: tightening %s from %04o to 0700 (the files hold prompt tokens)",
                    path, stat.S_IMODE(st.st_mode))
        os.chmod(path, 0o700)
    return path


def _file_is_ours(st: os.stat_result) -> str | None:
    """Why a cache file must not be used, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by another user ({_describe(st)})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by other users ({_describe(st)})"
    return None


# ---------------------------------------------------------------------------------------------
# The digest
# ---------------------------------------------------------------------------------------------


def _array_bytes(a: mx.array) -> memoryview:
    a = mx.contiguous(a.reshape(-1))
    if a.dtype == mx.bfloat16:  # no buffer format for bfloat16: hash the same bits as uint16
        a = a.view(mx.uint16)
    mx.eval(a)
    return memoryview(a).cast("B")


def kv_digest(kv: Sequence[Any], header: dict[str, str]) -> str:
    """SHA-256 (hex) over `header` (format, model id, tokens) and every tensor of `kv`
    (name, dtype, shape and bytes, in a fixed order; scalars in the state by value) plus each
    cache's class."""
    h = hashlib.sha256()
    for k in sorted(header):
        h.update(f"{k}={header[k]}\n".encode())
    for c in kv:
        h.update(f"class={type(c).__name__}\n".encode())
    for name, arr in sorted(tree_flatten([c.state for c in kv]), key=lambda kv_: kv_[0]):
        if not isinstance(arr, mx.array):
            h.update(f"{name}:{arr!r}\n".encode())
            continue
        h.update(f"{name}:{arr.dtype}:{tuple(arr.shape)}\n".encode())
        h.update(_array_bytes(arr))
    return h.hexdigest()


def check_layout(kv: list[Any], model: Any, n_tokens: int) -> None:
    """Raise ValueError unless `kv` has the model's cache layout and holds `n_tokens` positions."""
    ref = make_prompt_cache(model)
    if len(kv) != len(ref) or any(type(a) is not type(b) for a, b in zip(kv, ref, strict=True)):
        raise ValueError("cache layout does not match the model")
    fed = fed_tokens(kv)
    if fed is not None and fed != n_tokens:
        raise ValueError(f"cache holds {fed} tokens, expected {n_tokens}")
    if all(type(c) is KVCache for c in kv):
        # shape check per layer against a one-token probe: heads and head dims must agree
        model(mx.array([[0]]), cache=ref)
        for a, b in zip(kv, ref, strict=True):
            if a.keys.shape[:2] != b.keys.shape[:2] or a.keys.shape[3] != b.keys.shape[3] \
                    or a.values.shape[3] != b.values.shape[3] or a.keys.dtype != b.keys.dtype:
                raise ValueError("cache shapes do not match the model")


# ---------------------------------------------------------------------------------------------
# The file store
# ---------------------------------------------------------------------------------------------


class DiskCache:
    """Checkpoint files of one model in one private directory. Not thread-safe on its own:
    the caller (``PrefixCache``) holds its lock around every call."""

    def __init__(self, directory: str | os.PathLike[str], model: Any, model_id: str, max_bytes: int):
        self.directory = ensure_private_dir(directory)
        self.model = model
        self.model_id = model_id
        self.max_bytes = int(max_bytes)
        self.counters = dict.fromkeys(("disk_loads", "disk_writes", "disk_errors", "disk_evictions"), 0)
        self._files: dict[tuple[int, str], Path] = {}
        self._tokens: dict[tuple[int, str], np.ndarray] = {}  # files' token lists, read when first needed
        self._failed: set[tuple[int, str]] = set()  # writes that failed (full disk): not retried
        self._clean_temp_files()
        self._scan()

    def __len__(self) -> int:
        return len(self._files)

    def stats(self) -> dict[str, int]:
        return {**self.counters, "disk_files": len(self._files)}

    def nearest(self, q: np.ndarray, above: int, at_most: int) -> tuple[np.ndarray, int] | None:
        """The stored file sharing the longest prefix with ``q`` (more than ``above`` tokens, counted
        up to ``at_most``): (its tokens, the shared length), for a cache that can be cut back to a
        prefix (a spilled conversation whose answer the next turn re-renders differently)."""
        found: tuple[np.ndarray, int] | None = None
        for key in list(self._files):
            toks = self._file_tokens(key)
            if toks is None:
                continue
            cp = min(common_prefix_len(toks, q), at_most)
            if cp > above and (found is None or cp > found[1]):
                found = (toks, cp)
        return found

    def _file_tokens(self, key: tuple[int, str]) -> np.ndarray | None:
        """The token list in a file's metadata, read from its safetensors header alone (kept)."""
        if key in self._tokens:
            return self._tokens[key]
        try:
            with open(self._files[key], "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size < 64 << 20:
                    raise ValueError(f"header of {size} bytes")
                meta = json.loads(f.read(size)).get("__metadata__", {})
            toks = np.array([int(t) for t in meta.get("tokens", "").split(",") if t], dtype=np.int64)
        except (OSError, ValueError, KeyError) as exc:
            log.debug("prefix cache: cannot read the header of %s: %s", self._files.get(key), exc)
            return None
        if len(toks) != key[0]:
            return None
        self._tokens[key] = toks
        return toks

    def lengths(self, above: int, at_most: int) -> list[int]:
        """Token counts of stored files in (above, at_most], longest first."""
        return sorted({n for n, _ in self._files if above < n <= at_most}, reverse=True)

    # -- start-up ---------------------------------------------------------------------------

    def _clean_temp_files(self) -> None:
        """Remove temporary files whose writer is gone (a crash or kill -9 mid-write)."""
        for p in self.directory.iterdir():
            m = _TMP_RE.match(p.name)
            if not m:
                continue
            pid = int(m["pid"])
            if pid != os.getpid() and _pid_alive(pid):
                continue
            try:
                p.unlink()
                log.info("prefix cache: removed leftover temporary file %s", p.name)
            except OSError as exc:
                log.warning("prefix cache: could not remove leftover %s: %s", p, exc)

    def _scan(self) -> None:
        for p in self.directory.iterdir():
            m = _FILE_RE.match(p.name)
            if m and m["model"] == self.model_id:
                self._files[(int(m["n"]), m["hash"])] = p

    # -- write ------------------------------------------------------------------------------

    def _path(self, n: int, h: str) -> Path:
        return self.directory / f"{self.model_id}-{n}-{h}.safetensors"

    def save(self, tokens: np.ndarray, kv: list[Any], kind: str = "checkpoint") -> bool:
        """Write `kv` (holding exactly `tokens`) unless a file for these tokens exists. ``kind``:
        "checkpoint" (a system+tools prefix) or "spill" (a conversation evicted from memory).
        Returns whether a file was written; a failure (full disk) is logged, not raised."""
        n, h = len(tokens), token_hash(tokens)
        if (n, h) in self._files:
            return False
        if (n, h) in self._failed:  # a full or read-only disk: not retried on every request
            return False
        path = self._path(n, h)
        header = {"format": FILE_FORMAT, "model_id": self.model_id, "n_tokens": str(n),
                  "tokens": ",".join(map(str, np.asarray(tokens).tolist()))}
        tmp: str | None = None
        try:
            meta = {**header, "digest": kv_digest(kv, header), "kind": kind}
            # a new file (O_EXCL: never through a planted symlink), mode 0600, an unpredictable name
            # that still matches _TMP_RE (".NAME.RANDOM.PID.tmp.safetensors"); written through its fd
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.",
                                       suffix=f".{os.getpid()}.tmp.safetensors")
            with os.fdopen(fd, "wb") as f:
                save_prompt_cache(f, kv, meta)  # type: ignore[arg-type]  # mx.save_safetensors takes a file
            os.replace(tmp, path)
        except Exception as exc:  # noqa: BLE001 - a full disk must not fail the request
            log.warning("prefix cache: could not write %s: %s", path.name, exc)
            if tmp is not None:
                with contextlib.suppress(OSError):  # a read-only disk: EROFS here too
                    os.unlink(tmp)
            self.counters["disk_errors"] += 1
            if len(self._failed) < 4096:
                self._failed.add((n, h))
            return False
        self._failed.clear()  # space came back: what failed may fit now
        self._files[(n, h)] = path
        self._tokens[(n, h)] = np.asarray(tokens, dtype=np.int64).copy()
        self._prune(keep=path)
        self.counters["disk_writes"] += 1
        return True

    def _prune(self, keep: Path) -> None:
        files = []
        for key, p in self._files.items():
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, key, p))
        total = sum(f[1] for f in files)
        for _, size, key, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            try:
                p.unlink()
            except OSError as exc:
                log.warning("prefix cache: could not remove %s: %s", p, exc)
                continue
            self._files.pop(key, None)
            total -= size
            self.counters["disk_evictions"] += 1

    # -- read -------------------------------------------------------------------------------

    def load(self, tokens: np.ndarray) -> tuple[list[Any], str] | None:
        """(the KV state stored for exactly `tokens`, validated; the file's kind: "checkpoint" or
        "spill"), or None (no file, or a file that fails any check: it is then forgotten, logged as
        a warning and counted in disk_errors)."""
        key = (len(tokens), token_hash(tokens))
        path = self._files.get(key)
        if path is None:
            return None
        kv: list[Any]
        try:
            st = os.lstat(path)
            why = _file_is_ours(st)
            if why:
                raise ValueError(why)
            kv, meta = load_prompt_cache(str(path), return_metadata=True)  # type: ignore[no-untyped-call]  # (mlx-lm is untyped)
            self._validate(kv, meta, tokens)
        except Exception as exc:  # noqa: BLE001 - any unreadable or forged file is only skipped
            log.warning("prefix cache: ignoring unusable cache file %s: %s", path, exc)
            self._files.pop(key, None)
            self.counters["disk_errors"] += 1
            return None
        self.counters["disk_loads"] += 1
        try:
            os.utime(path)  # recently used: pruned last
        except OSError:
            pass
        return kv, meta.get("kind", "checkpoint")

    def _validate(self, kv: list[Any], meta: dict[str, str], tokens: np.ndarray) -> None:
        if meta.get("format") != FILE_FORMAT:
            raise ValueError(f"unknown format {meta.get('format')!r}")
        if meta.get("model_id") != self.model_id:
            raise ValueError(f"written for model {meta.get('model_id')!r}, loaded model is {self.model_id!r}")
        stored = np.array([int(t) for t in meta.get("tokens", "").split(",") if t], dtype=np.int64)
        if not np.array_equal(stored, tokens):
            raise ValueError("token content does not match the file name")
        header = {k: meta.get(k, "") for k in ("format", "model_id", "n_tokens", "tokens")}
        if meta.get("digest") != kv_digest(kv, header):
            raise ValueError("content digest mismatch: the tensors were changed after writing")
        check_layout(kv, self.model, len(tokens))
        mx.eval([c.state for c in kv])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
