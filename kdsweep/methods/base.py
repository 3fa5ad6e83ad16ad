"""What a distillation method is: one small class, one module.

A method declares
  * ``name``, ``summary``, ``reference``  - what `kdsweep methods` prints;
  * ``needs``   - which taps of teacher and student it reads ("logits",
                  "feature", "embedding"); the trainer computes only those;
  * ``space``   - its own hyperparameters (the learning rate is added for all);
  * heads       - any trainable modules it builds in ``__init__`` from the
                  models' tap shapes; they are optimised with the student;
  * ``forward`` - returns a dict of *weighted* loss terms; the trainer
                  minimises their sum and logs each one under its own name.

The trainer never names a method: it only reads these declarations.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import torch
import torch.nn as nn

from ..models import Outputs, Shapes
from ..space import Float

TAPS = ("logits", "feature", "embedding")


class Method(nn.Module):
    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    uses_teacher: ClassVar[bool] = True
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

    def forward(self, s: Outputs, t: Outputs | None, y: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        # `t` is shared (teacher cache, lockstep trials): read it, never modify it in place.
        raise NotImplementedError
