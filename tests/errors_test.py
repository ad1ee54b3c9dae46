"""The one-line error convention of every binary (mia_jax.errors, cli.run)."""

import errno
import os
import subprocess
import sys

from mia_jax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROGRAM = """
import errno, sys
from mia_jax import cli, errors

def main(argv):
  kind = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith('-') else ''
  if kind == 'user':
    raise errors.UserError('timestep out of range', '--timestep -3', 'use 0..999')
  if kind == 'disk':
    raise OSError(errno.ENOSPC, 'No space left on device', '/data/run/scores.npz')
  raise KeyError('a bug')

if __name__ == '__main__':
  cli.run(main)
"""


def _run(tmp_path, *args):
  script = tmp_path / "prog.py"
  script.write_text(_PROGRAM)
  return subprocess.run([sys.executable, str(script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": os.pathsep.join(
                            p for p in (ROOT, os.environ.get("PYTHONPATH"))
                            if p)})


def test_user_error_line():
  e = errors.UserError("bad thing", "--flag x", "do this")
  assert errors.one_line(e) == "error: bad thing (--flag x): do this"
  assert isinstance(e, ValueError)
  missing = errors.MissingInputError("no such folder", "data/x")
  assert isinstance(missing, FileNotFoundError)


def test_binary_prints_one_line_and_exits_2(tmp_path):
  out = _run(tmp_path, "user")
  assert out.returncode == 2
  assert out.stderr.strip() == (
      "error: timestep out of range (--timestep -3): use 0..999")


def test_full_disk_names_the_path(tmp_path):
  out = _run(tmp_path, "disk")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "error: No space left on device (/data/run/scores.npz): free space on "
      "that disk or write elsewhere")


def test_traceback_flag_and_bugs_keep_the_traceback(tmp_path):
  out = _run(tmp_path, "user", "--traceback")
  assert out.returncode != 0 and "Traceback" in out.stderr
  out = _run(tmp_path, "bug")
  assert out.returncode != 0 and "Traceback" in out.stderr and "KeyError" in out.stderr


def test_os_errors_of_the_environment_only():
  e = errors.from_os_error(OSError(errno.EACCES, "Permission denied", "/x"))
  assert isinstance(e, errors.UserError) and "(/x)" in str(e)
