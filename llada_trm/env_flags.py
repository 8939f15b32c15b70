"""Yes/no words, one vocabulary for environment variables (DEBUG, HF_HUB_OFFLINE, TRUNCATION_*) and text flags.

It sits at the package root, importing nothing, so that both data/ and training/ can use it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool | None:
    """True or False for a yes/no word (any case, spaces around ignored); None for anything else."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether environment variable `name` says yes; unset, empty or any other word is no."""
    environ = os.environ if environ is None else environ
    return parse_bool(environ.get(name, "")) is True
