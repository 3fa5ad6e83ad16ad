"""What a distillation method is: one small class, one module.

A method declares
  * ``name``, ``summary``, ``reference``  - what `kdsweep methods` prints;
  * ``needs``   - which taps of teacher and student it reads ("logits",
                  "feature", "embedding"); the trainer computes only those;
  * ``space``   - its own hyperparameters (the learning rate is added for all);
  * heads       - any trainable modules it builds in ``__init__`` from the
                  models' tap shapes; they are optimised with the student;
  * ``forward`` - returns a dict of *weighted* loss terms; the trainer
                  minimises their sum and logs each one under its own name;
  * ``needs_index`` - set by methods that keep per-sample state across steps
                  (CRD's memory bank): ``forward`` then also gets ``index``,
                  the batch's rows in the training split (a SampleIndex).
  * ``study_scope`` - held while a study's trials run: where a method keeps,
                  for the study's later trials, what every trial computes
                  alike (CRD: each step's negatives).

The trainer never names a method: it only reads these declarations.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar, Mapping, NamedTuple

import torch
import torch.nn as nn

from kdsweep.common.space import Float
from kdsweep.models.zoo import Outputs, Shapes


class SampleIndex(NamedTuple):
    """Which training samples a batch holds: `ids` (B,) int64 rows of the training split, in 0 .. total - 1."""

    ids: torch.Tensor
    total: int


class Method(nn.Module):
    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    uses_teacher: ClassVar[bool] = True
    needs_index: ClassVar[bool] = False
    space: ClassVar[dict[str, Float]] = {}

    def __init__(self, hp: Mapping[str, float], student: Shapes, teacher: Shapes | None, epochs: int):
        super().__init__()
        self.hp = dict(hp)
        self.epochs = epochs

    @classmethod
    def unsupported(cls, student: Shapes, teacher: Shapes | None) -> str | None:
        """Why this pair of models cannot serve the method, or None if it can."""
        if "feature" in cls.needs and not (student.spatial and teacher is not None and teacher.spatial):
            return f"{cls.name} needs spatial feature maps from both models"
        return None

    @classmethod
    def study_scope(cls) -> AbstractContextManager:
        """Held while a study's trials run. Its trials share the study's seed, so they come to the same steps again;
        a method whose steps compute something alike in every trial may keep it meanwhile."""
        return nullcontext()

    def forward(self, s: Outputs, t: Outputs | None, y: torch.Tensor, epoch: int, **kw) -> dict[str, torch.Tensor]:
        # `t` is shared (teacher cache, lockstep trials): read it, never modify it in place.
        # `epoch` is 0-based; `kw` holds `index` (a SampleIndex) for methods with needs_index.
        raise NotImplementedError
