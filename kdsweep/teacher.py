"""Teachers: trained once per (dataset, arch, seed, epochs, data size), cached, reused by every study."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .data import DeviceData, get_dataset
from .methods import get_method
from .models import Net, build_model, count_params
from .tracking import Tracker
from .train import Schedule, evaluate, train_student

TEACHERS_EXPERIMENT = "teachers"


def cache_dir() -> Path:
    """$KDSWEEP_CACHE, else ~/.cache/kdsweep."""
    env = os.environ.get("KDSWEEP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kdsweep"


def cache_path(dataset: str, arch: str, seed: int, epochs: int, data_size: int | None, val_fraction: float) -> Path:
    size = f"-n{data_size}" if data_size else ""
    val = "" if val_fraction == 0.1 else f"-v{val_fraction:g}"
    return cache_dir() / "teachers" / f"{dataset}-{arch}-s{seed}-e{epochs}{size}{val}.pt"


def train_teacher(dataset: str, arch: str, seed: int, epochs: int, data: DeviceData, tracker: Tracker, path: Path,
                  batch_size: int = 128, lr: float = 0.05) -> Path:
    """Train `arch` with cross-entropy, keep the best-val epoch, save it to `path`, log a `teachers` run."""
    torch.manual_seed(seed)
    model = build_model(arch, data.in_shape, data.num_classes)
    ce = get_method("ce")({}, model.shapes(data.in_shape), None, epochs)
    schedule = Schedule(epochs=epochs, batch_size=batch_size, lr=lr)
    exp = tracker.experiment(TEACHERS_EXPERIMENT)
    params = {"dataset": dataset, "arch": arch, "seed": seed, "epochs": epochs, "params": count_params(model),
              "data_size": data.n_train, **{k: v for k, v in vars(schedule).items() if k != "epochs"}}
    run = tracker.start(exp, path.stem, {"kdsweep.role": "teacher", "kdsweep.dataset": dataset})
    try:
        tracker.log(run, params=params)
        bar = tqdm(total=epochs, desc=f"teacher {arch}", unit="epoch", leave=False, disable=None)
        result = train_student(model, ce, None, data, schedule, progress=lambda e: bar.update(1),
                               on_epoch=lambda s: tracker.log(run, s.metrics(), step=s.epoch))
        bar.close()
        model.load_state_dict(result.state["student"])
        test_loss, test_acc = evaluate(model, data, "test")
        meta = {"dataset": dataset, "seed": seed, "epochs": epochs, "best_epoch": result.best_epoch,
                "val_acc": result.best_val_acc, "test_acc": test_acc}
        checkpoint.save(path, arch, data.in_shape, data.num_classes, {"student": result.state["student"]}, meta)
        tracker.log(run, {"best_val_acc": result.best_val_acc, "test_acc": test_acc, "test_loss": test_loss,
                          "best_epoch": result.best_epoch}, tags={"kdsweep.checkpoint": str(path)})
        tracker.client.log_artifact(run, str(path), "checkpoint")
        tracker.end(run)
    except BaseException:
        tracker.end(run, "FAILED")
        raise
    return path


def get_teacher(cfg, data: DeviceData, tracker: Tracker, say=print) -> tuple[Net, dict]:
    """The study's teacher: --teacher-checkpoint, else the cache, else trained now (and said so)."""
    if cfg.teacher_checkpoint:
        path = Path(cfg.teacher_checkpoint)
    else:
        path = cache_path(cfg.dataset, cfg.teacher, cfg.seed, cfg.teacher_epochs, cfg.data_size, cfg.val_fraction)
        if not path.is_file():
            say(f"No cached teacher {cfg.teacher} for {cfg.dataset} (seed {cfg.seed}, {cfg.teacher_epochs} epochs): training one now -> {path}")
            train_teacher(cfg.dataset, cfg.teacher, cfg.seed, cfg.teacher_epochs, data, tracker, path,
                          batch_size=get_dataset(cfg.dataset).batch_size)
    model, payload = checkpoint.load_model(path, cfg.teacher, data.in_shape, data.num_classes)
    model.to(data.device).eval().requires_grad_(False)
    info = {"path": str(path), **payload.get("meta", {})}
    return model, info
