"""The one place a dataset name is resolved: a built-in (builtin.py) or a spec (sources.py), its shape,
and its splits loaded onto the device.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kdsweep.common.errors import UserError
from kdsweep.data.builtin import DATASETS, DatasetSpec, default_data_dir
from kdsweep.data.device_data import DeviceData


def get_dataset(name: str) -> DatasetSpec:
    """A built-in dataset, or a spec's recipe (imagefolder:PATH, torchvision:NAME, module:function, a registered
    name; sources.py): cheap, nothing is read; a spec's shape and classes come from dataset_shape()."""
    if name in DATASETS:
        return DATASETS[name]
    from kdsweep.data import sources

    if sources.is_spec(name):
        return sources.recipe(name)
    raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, or imagefolder:PATH, torchvision:NAME, "
                    f"package.module:function")


def register(name: str, data) -> None:
    """Name in-memory data (tensors, arrays, or a function returning them) as a dataset of this process: see
    sources.register; the hook the Python API uses to put a notebook's tensors in a StudyConfig."""
    from kdsweep.data import sources

    sources.register(name, data)


def dataset_shape(name: str, data_dir: str | Path | None = None, image_size: int | None = None) -> tuple[tuple[int, ...], int]:
    """(input shape, number of classes): declared for a built-in; read from the data for a spec (once per process)."""
    spec = get_dataset(name)
    if name in DATASETS:
        if image_size is not None:
            raise UserError(f"--image-size resizes imagefolder:, torchvision: and module datasets; {name} is used at "
                            f"its own size {'x'.join(map(str, spec.in_shape[1:]))}")
        return spec.in_shape, spec.num_classes
    from kdsweep.data import sources

    return sources.shape(spec.name, data_dir, image_size)


def load_data(name: str, data_dir: Path | None, size: int | None, seed: int, val_fraction: float, device: torch.device,
              stream_seed: int | None = None, image_size: int | None = None, preprocess: str | None = None) -> DeviceData:
    """The dataset's splits for `seed`; `stream_seed` (default: `seed`) seeds the training batch stream only.

    `image_size` resizes a spec's images (sources.py); a built-in refuses it. `preprocess`: what every model
    sees (inputs.py; None: standardize).
    """
    from kdsweep.data import sources

    spec = get_dataset(name)
    if size is not None and size < 10:
        raise UserError(f"--data-size must be at least 10, got {size}")
    if name in DATASETS:
        dataset_shape(name, data_dir, image_size)  # refuses an --image-size
        raw = spec.load(Path(data_dir) if data_dir else default_data_dir(), size)
    else:
        raw = sources.load(spec.name, data_dir, size, image_size)
    device = torch.device(device)
    sources.check_fits(sum(t.nbytes for t in (raw.train_x, raw.train_y, raw.test_x, raw.test_y)), device)
    data = DeviceData(raw, seed, val_fraction, device, stream_seed, preprocess)
    data.tag = name if name in DATASETS else f"{sources.name_tag(spec.name)}-{sources.train_digest(raw)[:12]}"
    return data
