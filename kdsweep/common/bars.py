"""The progress bar class: tqdm's notebook widget where Jupyter can draw it, the plain terminal bar elsewhere.

tqdm.auto picks the notebook bar in any Jupyter kernel, and without ipywidgets that bar only warns
("TqdmWarning: IProgress not found") before falling back: the warning is all a user sees of it.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:  # no widgets to draw with: the plain bar, which a notebook shows as text
    from tqdm import tqdm

__all__ = ["tqdm"]
