"""The progress bar of the model converters: shown by default only for models worth waiting for."""

import sys
from typing import Optional

from tqdm.auto import tqdm

# Models with at least this many weights to quantize show a progress bar by default.
PROGRESS_MIN_WEIGHTS = 1 << 24


def progress_bar(total_weights: int, progress: Optional[bool]) -> tqdm:
    """A tqdm bar over ``total_weights`` weights on stderr.

    Args:
      total_weights: the weights the converter will quantize.
      progress: True or False to force it on or off; None shows it from ``PROGRESS_MIN_WEIGHTS`` on.
    """
    show = total_weights >= PROGRESS_MIN_WEIGHTS if progress is None else progress
    return tqdm(total=total_weights, desc="quantizing", unit="w", unit_scale=True, disable=not show, file=sys.stderr)
