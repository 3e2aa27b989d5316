"""Type checks of the public functions' plain options: a wrong type is one line naming the option, not a
``TypeError`` from deep inside torch after minutes of work, and NumPy numbers become plain ones (they
would otherwise reach the PNG's JSON, which refuses them)."""

from __future__ import annotations

import math
import numbers

import numpy as np

from .errors import UserError

#: The largest seed: torch's CPU generator (every run's noise is drawn there) keeps only a seed's low 32 bits,
#: so 0 and 2^32 would be two seeds of one image.
MAX_SEED = 2**32 - 1


def whole(name: str, value: object) -> int:
    """A whole number (Python or NumPy), as an int."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise UserError(f"{name} must be a whole number (got {value!r})")
    return int(value)


def number(name: str, value: object) -> float:
    """A finite real number (Python or NumPy), as a float."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number (got {value!r})")
    return float(value)


def positive(name: str, value: object) -> float:
    """A finite number above 0 (an lr, an attention scale), as a float."""
    value = number(name, value)
    if not value > 0:
        raise UserError(f"{name} must be positive (got {value})")
    return value


def non_negative(name: str, value: object) -> float:
    """A finite number of at least 0 (a weight: 0 turns its term off), as a float."""
    value = number(name, value)
    if value < 0:
        raise UserError(f"{name} must be >= 0 (got {value})")
    return value


def flag(name: str, value: object) -> bool:
    """True or False only (NumPy's too, as numbers are taken from NumPy): ``adain="no"`` must not turn AdaIN on."""
    if not isinstance(value, bool | np.bool_):
        raise UserError(f"{name} must be True or False (got {value!r})")
    return bool(value)
