"""Where nbollama keeps what it makes on disk: ``$NBOLLAMA_CACHE`` or ``~/.cache/nbollama``.

One rule for the bundled model, the AMX probe's answers, llama-server builds and
the result store (``nbollama/build.py`` repeats it: it runs before the package
can be imported).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root"]

CACHE_ENV = "NBOLLAMA_CACHE"


def cache_root() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "nbollama"
