"""What the models see: a study's input preprocessing, declared as a setting and read without torch.

Every input is first put on a common scale (uint8 images divided by 255, float inputs as they are),
then one of:
  * `standardize` (the default): (x - mean) / std per channel, with a built-in dataset's declared
    statistics, or the training split's for your own data (computed after the validation slice left);
  * `none`: nothing more: images in [0, 1], as torchvision's ToTensor() gives them;
  * `MEAN/STD`: your own statistics, one number per channel or one for all, e.g. `0.1307/0.3081` or
    `0.485,0.456,0.406/0.229,0.224,0.225` (torchvision's ImageNet weights).

The teacher and every student see the same inputs, so a teacher trained elsewhere must be given the
preprocessing it was trained with; study/loop.py refuses one that scores near chance on them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kdsweep.common.errors import UserError

STANDARDIZE = "standardize"
NONE = "none"
DEFAULT = STANDARDIZE
HOW = f"{STANDARDIZE}, {NONE} or MEAN/STD (e.g. 0.1307/0.3081, or 0.485,0.456,0.406/0.229,0.224,0.225)"


@dataclass(frozen=True)
class Preprocess:
    """A parsed preprocessing: `kind` is standardize, none or given (then `mean` and `std` hold its numbers)."""

    text: str
    kind: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def tag(self) -> str:
        """A short token for study names and teacher files: empty for the default, so older names stay valid."""
        if self.kind == STANDARDIZE:
            return ""
        if self.kind == NONE:
            return "pnone"
        return "p" + hashlib.sha256(self.text.encode()).hexdigest()[:6]

    def per_channel(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The given mean and std for `channels` channels (one number serves all), or a one-line refusal."""
        if len(self.mean) == 1:
            return self.mean * channels, self.std * channels
        if len(self.mean) != channels:
            raise UserError(f"--preprocess {self.text} gives {len(self.mean)} means and stds, and the inputs have "
                            f"{channels} channel{'s' * (channels != 1)}: give one number per channel, or one for all")
        return self.mean, self.std


def parse(text: str | None) -> Preprocess:
    """`standardize`, `none` or `MEAN/STD` as a Preprocess; anything else is refused in one line."""
    text = DEFAULT if text is None else str(text).strip()
    if text.lower() in (STANDARDIZE, "standardise"):
        return Preprocess(STANDARDIZE, STANDARDIZE)
    if text.lower() == NONE:
        return Preprocess(NONE, NONE)
    mean_text, slash, std_text = text.partition("/")
    try:
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError:
        mean = std = ()
    if not slash or not mean or len(mean) != len(std):
        raise UserError(f"--preprocess {text!r} is not one of {HOW}; MEAN and STD need as many numbers each")
    if not all(s > 0 for s in std):
        raise UserError(f"--preprocess {text}: every std must be positive")
    return Preprocess(text, "given", mean, std)

