"""What ``%%generate`` hands back: the ``Results`` of one cell, and the
``BackgroundGeneration`` of a ``--background`` run."""

from __future__ import annotations

from ._api.background import BackgroundGeneration
from ._api.results import COMPACT_ROWS, Results

__all__ = ["Results", "BackgroundGeneration", "COMPACT_ROWS"]
