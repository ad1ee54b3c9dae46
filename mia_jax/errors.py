"""The one error type for a user's mistake, and how binaries show it.

An audit tool meets untrusted input as the normal case. A mistake in that
input (a bad flag, a corrupt file, overlapping member sets) is a `UserError`:
the binaries print it as ONE line,

    error: <what> (<input>): <what to do>

and exit with status 2, without a traceback (``--traceback`` shows it). Any
other exception is a bug and keeps its traceback.

Library modules raise `UserError` (or a subclass) at the boundary, before any
work, so that nothing is written for an input that is refused.
"""

from __future__ import annotations

from typing import Optional


class UserError(ValueError):
  """A refused input: what is wrong, which input, and what to do.

  Subclasses `ValueError` so callers that already catch ValueError (and the
  tests that expect it) keep working.

  Attributes:
    what: what is wrong, e.g. "timestep out of range".
    input: the offending input as the user wrote it (flag, path, id, key).
    todo: what to do instead, with the valid range or form.
  """

  def __init__(self, what: str, input: Optional[str] = None,  # pylint: disable=redefined-builtin
               todo: Optional[str] = None):
    self.what = what
    self.input = input
    self.todo = todo
    super().__init__(self.line())

  def line(self) -> str:
    """``<what> (<input>): <what to do>``, without the ``error:`` prefix."""
    text = self.what
    if self.input is not None:
      text += f" ({self.input})"
    if self.todo:
      text += f": {self.todo}"
    return text


def one_line(error: BaseException) -> str:
  """The ``error: ...`` line a binary prints for a refused input."""
  if isinstance(error, UserError):
    text = error.line()
  else:
    text = str(error) or type(error).__name__
  return "error: " + " ".join(text.split())


class MissingInputError(UserError, FileNotFoundError):
  """A file or folder the user named does not exist (or lacks a part)."""


def from_os_error(error: BaseException) -> BaseException:
  """A full disk or a forbidden path as a `UserError` naming the path."""
  if isinstance(error, UserError) or not isinstance(error, OSError):
    return error
  import errno  # pylint: disable=g-import-not-at-top
  todo = {errno.ENOSPC: "free space on that disk or write elsewhere",
          errno.EDQUOT: "free space in your quota or write elsewhere",
          errno.EROFS: "write to a writable location",
          errno.ENOTDIR: "a part of the path is a file, not a folder: choose "
                         "another path",
          errno.EISDIR: "the path is a folder: name a file instead",
          }.get(error.errno, "check the path's permissions or write elsewhere")
  return UserError(error.strerror or str(error),
                   error.filename or "an output file", todo)


def check_int(value, flag: str, *, minimum: int = 1,
              allow_none: bool = False) -> None:
  """Refuses ``value`` unless it is an integer >= ``minimum`` (or None)."""
  if value is None and allow_none:
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
      value < minimum):
    raise UserError(f"{flag} must be an integer >= {minimum}",
                    f"{flag} {value!r}", f"pass an integer >= {minimum}" + (
                        " or leave it unset" if allow_none else ""))
