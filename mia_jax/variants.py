"""Score-row names: typed records, turned into strings only for files.

A score row (a column of scores.npz, a row of metrics.json) is a `Variant`:
the attack, its OMS depth, and where relevant the timestep or the chain
distance index. Code passes `Variant`s around; `Variant.name` writes the one
string form and `parse` is the one reader of it:

    naive_oms2          Variant("naive", oms_steps=2)
    pia_t200_oms1       Variant("pia", oms_steps=1, timestep=200)
    naive_dist3         Variant("naive", distance=3)
    probe               Variant("probe")   (no structure)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

_NAME_RE = re.compile(
    r"^(?P<attack>.+?)(?:_t(?P<timestep>\d+))?"
    r"(?:_oms(?P<oms>\d+)|_dist(?P<dist>\d+))$")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One score row.

  Attributes:
    attack: the attack (or statistic) name, e.g. "pia", "gsa2", "qr".
    oms_steps: the OMS depth n of the row, or None.
    timestep: the attack timestep when a run sweeps several, or None.
    distance: n of a chain-distance row ``-sum |eps^n - eps^0|^p``, or None.
  """

  attack: str
  oms_steps: Optional[int] = None
  timestep: Optional[int] = None
  distance: Optional[int] = None

  def __post_init__(self):
    if self.oms_steps is not None and self.distance is not None:
      raise ValueError("a row is an OMS depth or a chain distance, not both")

  @property
  def name(self) -> str:
    """The string form used in files."""
    out = self.attack
    if self.timestep is not None:
      out += f"_t{int(self.timestep)}"
    if self.oms_steps is not None:
      out += f"_oms{int(self.oms_steps)}"
    elif self.distance is not None:
      out += f"_dist{int(self.distance)}"
    return out

  @property
  def group(self) -> str:
    """The attack a row belongs to (one plot panel per group)."""
    return self.attack


def parse(name: str) -> Variant:
  """The `Variant` of a row name (a name without structure: just the attack)."""
  m = _NAME_RE.match(name)
  if not m:
    return Variant(name)
  return Variant(
      m["attack"], oms_steps=None if m["oms"] is None else int(m["oms"]),
      timestep=None if m["timestep"] is None else int(m["timestep"]),
      distance=None if m["dist"] is None else int(m["dist"]))
