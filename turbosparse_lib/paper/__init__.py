"""The paper's own numbers (``values``), the pass/fail targets of this companion (``targets``), the verdict of
each claim (``claims``) and the README's claims block written from them (``report``).

Notebooks, the README and the claims report take every number of the paper from here, so a
number typed once is the number shown everywhere; none is typed into a notebook cell.
"""

from .targets import TARGETS, Target, check, get_target
from .values import PAPER, PaperValue, get, table

__all__ = ["PAPER", "PaperValue", "get", "table", "TARGETS", "Target", "get_target", "check"]
