"""Atomic file writes: the one implementation every writer of the library uses.

A file is written to a temporary name in its own directory, flushed to disk
and renamed over the target (`os.replace`, atomic on POSIX), so a reader --
or a run resumed after a kill -- sees either the old file or the whole new
one, never a torn write. Temporaries carry ``.tmp-`` in their name, which
the runner's shard loader and `rundir` treat as leftovers.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

import numpy as np


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
  """Writes ``data`` to ``path`` atomically; returns the path."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-",
                             suffix="-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates 0600 files; give the result ordinary rw-r--r-- access.
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def write_text(path: str | os.PathLike, text: str) -> str:
  """UTF-8 text, atomically."""
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs) -> str:
  """``json.dumps(obj, indent=2, sort_keys=True, **dumps_kwargs)``, atomically."""
  kwargs = {"indent": 2, "sort_keys": True, **dumps_kwargs}
  return write_text(path, json.dumps(obj, **kwargs))


def savez(path: str | os.PathLike, **arrays) -> str:
  """``np.savez`` to ``path`` (uncompressed), atomically."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return write_bytes(path, buf.getvalue())
