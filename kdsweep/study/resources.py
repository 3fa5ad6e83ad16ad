"""What the studies of one process open once: stores, the data split and the teacher.

A sweep runs one study per method on the same pair, split and teacher. Opened per study they cost
start-up per method (a store's engine and schema check, the data's preparation, the teacher's load and
validation pass), and each study would hold its own copy of the same teacher: the trials of two
methods could then not train in one lockstep group (trial.py). Each is keyed by what it depends on,
so two studies that differ in any of it get their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
import torch

from kdsweep.common.uris import redact
from kdsweep.data.device_data import DeviceData
from kdsweep.data.dispatch import load_data
from kdsweep.study.config import StudyConfig
from kdsweep.study.optuna_storage import open_storage
from kdsweep.tracking.tracker import Tracker
from kdsweep.training.teacher import get_teacher, study_cache_path


@dataclass
class Resources:
    """Opened on first use, then shared by every study that asks with the same key."""

    storages: dict[str, optuna.storages.RDBStorage] = field(default_factory=dict)
    trackers: dict[str, Tracker] = field(default_factory=dict)
    datas: dict[tuple, DeviceData] = field(default_factory=dict)
    teachers: dict[tuple, tuple[torch.nn.Module, dict]] = field(default_factory=dict)

    def storage(self, url: str | None) -> optuna.storages.RDBStorage:
        if url not in self.storages:
            self.storages[url] = open_storage(url)
        return self.storages[url]

    def tracker(self, uri: str | None, say: Callable[[str], None]) -> Tracker:
        if uri not in self.trackers:
            self.trackers[uri] = tracker = Tracker(uri)
            if tracker.made_in is not None:
                how = {"copied": "copied from kdsweep's cache",
                       "made": "made by MLflow's migrations (once per MLflow version: later stores copy them)",
                       }.get(tracker.seeded, "made by MLflow's migrations")
                say(f"new MLflow store {redact(tracker.uri)}: its tables {how} in {tracker.made_in:.1f} s")
        return self.trackers[uri]

    def data(self, cfg: StudyConfig, device: torch.device) -> DeviceData:
        key = _data_key(cfg, device)
        if key not in self.datas:
            self.datas[key] = load_data(cfg.dataset, cfg.data_dir, cfg.data_size, cfg.seed, cfg.val_fraction, device,
                                        image_size=cfg.image_size, preprocess=cfg.preprocess)
        return self.datas[key]

    def teacher(self, cfg: StudyConfig, data: DeviceData, say: Callable[[str], None], storage_url: str,
                wanted: str | None) -> tuple[torch.nn.Module, dict]:
        """The study's teacher (training/teacher.py); `wanted`: the digest the study recorded, if it did."""
        # The teacher's identity is its cache file's name (arch, teacher seed, epochs, control, inputs, split), or the
        # file the user gave; the taps' paths are part of the built model.
        key = (*_data_key(cfg, data.device), cfg.teacher_checkpoint or study_cache_path(cfg, data).name,
               cfg.teacher_feature, cfg.teacher_embedding)
        held = self.teachers.get(key)
        if held is None or (wanted is not None and held[1].get("sha256") != wanted):
            self.teachers[key] = get_teacher(cfg, data, self.tracker(cfg.tracking_uri, say), say, storage_url, wanted)
        return self.teachers[key]


def _data_key(cfg: StudyConfig, device: torch.device) -> tuple[Any, ...]:
    return (cfg.dataset, cfg.data_dir, cfg.data_size, cfg.seed, cfg.val_fraction, str(device), cfg.image_size,
            cfg.preprocess)
