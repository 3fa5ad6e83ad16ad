"""Datasets from anywhere: an image folder, a torchvision dataset class, the user's own function, or tensors.

`--dataset` takes a built-in name (builtin.py) or one of these specs:

  * `imagefolder:PATH`     class folders under PATH/train and PATH/test (PATH/val when there is no test/);
  * `torchvision:NAME`     torchvision.datasets.NAME read from --data-dir (never downloaded);
  * `package.module:func`  func() returns (train_x, train_y, test_x, test_y) or a dict with those keys;
  * a name given to `register(name, data)` in this process (the Python API's in-memory data).

Whatever the source, the result is a data.RawData like the built-ins': uint8 images (N, C, H, W) or
float32 inputs, int64 labels; images are resized to `--image-size` when given (shorter side, then a
centre crop: the aspect ratio is kept). Normalisation statistics are left to DeviceData, which computes
them from the training split once the validation slice is out (see data.channel_stats).

Decoding an image folder is the slow part, so its tensors are cached on disk under
<data dir>/cache/, keyed by the spec, --image-size and every file's path, size and mtime: a
second study (or another process) loads the cache instead of decoding again. A resolved source is
also kept per process, so a sweep's many configs read it once.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kdsweep.common.errors import UserError
from kdsweep.common.torchvision_import import torchvision
from kdsweep.data.builtin import Augment, DatasetSpec, RawData, default_data_dir

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes read as one channel
CACHE_VERSION = 1
_REGISTERED: dict[str, Any] = {}
_MEMO: dict[tuple, RawData] = {}
DECODED = [0]  # images decoded by this process: a load from the disk cache decodes none (tests count on it)

# User data has no built-in pair; its recipe is a plain, common one (the same for every method of a sweep): these
# lengths, and DatasetSpec's own optimiser, weight decay and teacher lr (declared there, not restated here).
RECIPE = dict(teacher_epochs=30, epochs=10, batch_size=64)


# ---------------------------------------------------------------------------------------------- specs


def register(name: str, data: Any) -> None:
    """Name in-memory data as a dataset of this process: `data` is (train_x, train_y, test_x, test_y), a dict
    with those keys, or a function returning either (called when first used).

    The name then works wherever a dataset name does (a StudyConfig's `dataset`); it is not seen by other
    processes, so a study on it is confirmed and reported from the same process (the Python API).
    """
    from kdsweep.data.catalog import DATASET_NAMES

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise UserError(f"dataset name {name!r}: use letters, digits, '_', '.', '-'")
    if name in DATASET_NAMES:
        raise UserError(f"dataset name {name!r} is a built-in dataset; choose another")
    _REGISTERED[name] = data
    for key in [k for k in _MEMO if k[0] == name]:  # registered again: the new data, not the old
        del _MEMO[key]


def is_spec(name: str) -> bool:
    """True for user data (a spec or a registered name); False for the built-ins and unknown names."""
    return ":" in name or name in _REGISTERED


def kind(name: str) -> str:
    if name in _REGISTERED:
        return "registered"
    prefix = name.split(":", 1)[0]
    return prefix if prefix in ("imagefolder", "torchvision") else "module"


def canonical(name: str) -> str:
    """The spec as a study records it: an image folder by its absolute path (the same study from any directory)."""
    if name.startswith("imagefolder:"):
        path = name[len("imagefolder:"):]
        if not path:
            raise UserError("--dataset imagefolder:PATH needs a path (class folders under PATH/train and PATH/test)")
        return f"imagefolder:{Path(path).expanduser().resolve()}"
    if kind(name) == "module":
        mod, _, attr = name.partition(":")
        if not re.fullmatch(r"[A-Za-z_][\w.]*", mod) or not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", attr):
            raise UserError(f"unknown dataset {name!r}: a spec is imagefolder:PATH, torchvision:NAME or "
                            f"package.module:function")
    return name


def name_tag(name: str) -> str:
    """The spec in a study or file name: readable, safe characters, and unique (a short hash of the spec)."""
    if not is_spec(name):
        return name
    k = kind(name)
    stem = {"imagefolder": lambda: Path(name.split(":", 1)[1]).name, "torchvision": lambda: name.split(":", 1)[1],
            "registered": lambda: name, "module": lambda: name.replace(":", ".")}[k]()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._")[:40] or "data"
    if k == "imagefolder":  # two folders of one name are two datasets
        return f"{stem}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return stem


def recipe(name: str) -> DatasetSpec:
    """The static part of a spec's DatasetSpec: no default pair; shape and classes come from the data (shape())."""
    name = canonical(name)
    return DatasetSpec(name, lambda root, size: load(name, root, size, None), "", "", in_shape=(), num_classes=0, **RECIPE)


def data_root(name: str, data_dir: str | Path | None) -> Path:
    """Where a spec's data is read: its folder, or --data-dir (the default data dir) for torchvision and modules."""
    if name.startswith("imagefolder:"):
        return Path(name[len("imagefolder:"):])
    return Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()


# ---------------------------------------------------------------------------------------------- loading


def load(name: str, data_dir: str | Path | None, size: int | None, image_size: int | None) -> RawData:
    """The spec's data as RawData (memoised per process; image folders cached on disk)."""
    from kdsweep.data.builtin import _subset

    raw = resolve(name, data_dir, image_size)
    if size is None or size >= len(raw.train_y):
        return raw
    x, y = _subset(raw.train_x, raw.train_y, size, 0)
    return RawData(x, y, raw.test_x, raw.test_y, None, None, raw.num_classes, raw.augment, dict(raw.provenance))


def shape(name: str, data_dir: str | Path | None, image_size: int | None) -> tuple[tuple[int, ...], int]:
    """(input shape, number of classes) of a spec: read from the data itself."""
    raw = resolve(name, data_dir, image_size)
    return tuple(raw.train_x.shape[1:]), raw.num_classes


def resolve(name: str, data_dir: str | Path | None, image_size: int | None) -> RawData:
    name = canonical(name)
    if image_size is not None and image_size < 1:
        raise UserError(f"--image-size must be at least 1, got {image_size}")
    root = data_root(name, data_dir)
    key = (name, str(root), image_size)
    if key not in _MEMO:
        k = kind(name)
        if k == "imagefolder":
            raw = _imagefolder(name, root, image_size)
        elif k == "torchvision":
            raw = _torchvision(name, root, image_size)
        else:
            raw = _arrays(name, _call_source(name), image_size)
        raw.provenance.update({"data_source": k, "image_size": image_size or "", "data_classes": raw.num_classes,
                               "in_shape": "x".join(map(str, raw.train_x.shape[1:]))})
        _MEMO[key] = raw
    return _MEMO[key]


def default_augment(x: torch.Tensor) -> Augment:
    """The same for every method: crop (pad 1/8 of the side) and flip for images of 32 px and more, none below
    (small images lose too much to a crop, and a flip is wrong for digits and text) nor for signals."""
    if x.dim() == 4 and min(x.shape[2:]) >= 32:
        return Augment(pad=max(1, min(x.shape[2:]) // 8), flip=True)
    return Augment()


# ---------------------------------------------------------------------------------------------- image folders


@dataclass
class _Folder:
    root: Path
    classes: list[str]
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]
    test_dir: str


def _scan(root: Path) -> _Folder:
    """The folder's classes and files, checked: one line for each way it cannot be a dataset."""
    where = f"imagefolder {root}"
    if not root.is_dir():
        raise UserError(f"{where}: no such directory")
    train = root / "train"
    if not train.is_dir():
        raise UserError(f"{where}: no train/ folder (expected {root}/train/<class>/<images> and {root}/test/<class>/...)")
    test_dir = "test" if (root / "test").is_dir() else "val" if (root / "val").is_dir() else None
    if test_dir is None:
        raise UserError(f"{where}: no test/ or val/ folder beside train/ (the held-out split, with the same class folders)")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    index = {c: i for i, c in enumerate(classes)}
    train_files = _files(root, "train", index)
    if not train_files:
        raise UserError(f"{where} holds no images under train/ (expected train/<class>/<image files>)")
    if len({y for _, y in train_files}) < 2:
        only = classes[train_files[0][1]]
        raise UserError(f"{where} has one class ({only}) with images under train/: at least two are needed")
    test_files = _files(root, test_dir, index)
    if not test_files:
        raise UserError(f"{where} holds no images under {test_dir}/")
    return _Folder(root, classes, train_files, test_files, test_dir)


def _files(root: Path, split: str, index: dict[str, int]) -> list[tuple[Path, int]]:
    out, odd = [], []
    base = root / split
    for entry in sorted(base.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise UserError(f"imagefolder {root}: {split}/{entry.name} is not in a class folder "
                            f"(images go in {split}/<class>/); move or remove it")
        if entry.name not in index:
            raise UserError(f"imagefolder {root}: {split}/{entry.name} is not a class of train/ "
                            f"({', '.join(index) if len(index) <= 8 else f'{len(index)} classes'})")
        for dirpath, dirnames, filenames in os.walk(entry):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.startswith("."):
                    continue
                p = Path(dirpath) / f
                (out if p.suffix.lower() in IMAGE_EXTS else odd).append((p, index[entry.name]))
    if odd:
        first = odd[0][0].relative_to(root)
        raise UserError(f"imagefolder {root}: {first} is not an image ({len(odd)} such file{'s' * (len(odd) > 1)}; "
                        f"images end in {', '.join(IMAGE_EXTS[:5])}, ...): move or remove them")
    return out


def _folder_key(name: str, folder: _Folder, image_size: int | None) -> str:
    """What the decoded tensors depend on: the spec, the size, and every file's path, size and mtime."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, name, image_size, folder.classes, folder.test_dir]).encode())
    for p, y in folder.train + folder.test:
        st = p.stat()
        h.update(f"{p.relative_to(folder.root)}\0{y}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_file(name: str, key: str) -> Path:
    return default_data_dir() / "cache" / f"{name_tag(name)}-{key[:16]}.pt"


def _imagefolder(name: str, root: Path, image_size: int | None) -> RawData:
    folder = _scan(root)
    key = _folder_key(name, folder, image_size)
    path = cache_file(name, key)
    d = _read_cache(path, key)
    if d is None:
        d = _decode_folder(folder, image_size)
        _write_cache(path, {**d, "key": key})
    x = d["train_x"]
    prov = {"data_path": str(root), "data_files": len(folder.train) + len(folder.test), "data_cache": str(path)}
    return RawData(x, d["train_y"], d["test_x"], d["test_y"], None, None, len(folder.classes), default_augment(x), prov)


def _read_cache(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        return d if d.get("key") == key and d["train_x"].dtype == torch.uint8 else None
    except Exception:  # damaged or foreign: decode again (and replace it)
        return None


def _write_cache(path: Path, d: dict) -> None:
    from kdsweep.common.atomic import atomic_save

    try:  # a cache only: a read-only data dir just means decoding every time
        atomic_save(d, path)
    except OSError:
        pass


def _open(path: Path, root: Path):
    from PIL import Image, UnidentifiedImageError

    limit = os.environ.get("KDSWEEP_MAX_IMAGE_PIXELS")
    if limit:
        Image.MAX_IMAGE_PIXELS = int(limit)
    try:
        im = Image.open(path)
        im.size  # noqa: B018 - the header is read now: a broken file fails here
        return im
    except Image.DecompressionBombError as e:  # far larger than any training image: a mistake or an attack
        raise UserError(f"imagefolder {root}: {path.relative_to(root)} is too large to decode safely ({e.args[0].split(' exceeds')[0]}); "
                        f"resize it, or allow it with KDSWEEP_MAX_IMAGE_PIXELS=N (and shrink with --image-size)") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"imagefolder {root}: {path.relative_to(root)} cannot be read as an image "
                        f"({type(e).__name__})") from None


def _decode_folder(folder: _Folder, image_size: int | None) -> dict[str, torch.Tensor]:
    """Decode every image once into preallocated uint8 tensors (threads: PIL decodes without the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    files = folder.train + folder.test
    threads = min(8, os.cpu_count() or 1)

    def header(item):
        with _open(item[0], folder.root) as im:
            return im.size, im.mode

    with ThreadPoolExecutor(threads) as pool:
        heads = list(pool.map(header, files))
    gray = all(mode in GRAY_MODES for _, mode in heads)
    channels, mode = (1, "L") if gray else (3, "RGB")  # RGB unless every image is grayscale; alpha dropped
    if image_size is None:
        sizes = {s for s, _ in heads}
        if len(sizes) > 1:
            (a, pa), (b, pb) = [(s, files[[t for t, _ in heads].index(s)][0]) for s in sorted(sizes)[:2]]
            raise UserError(f"imagefolder {folder.root} holds images of different sizes ({a[0]}x{a[1]} in "
                            f"{pa.relative_to(folder.root)}, {b[0]}x{b[1]} in {pb.relative_to(folder.root)}): "
                            f"pass --image-size N to resize them all to NxN")
        w, h = sizes.pop()
    else:
        w = h = image_size
    check_fits(len(files) * channels * h * w, torch.device("cpu"), "decoding it")
    out = torch.empty(len(files), channels, h, w, dtype=torch.uint8)

    def decode(i: int) -> None:
        import numpy as np

        with _open(files[i][0], folder.root) as im:
            try:
                img = _fit(im.convert(mode), image_size)
                arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
            except OSError as e:  # a header that reads but pixels that do not (a truncated file)
                raise UserError(f"imagefolder {folder.root}: {files[i][0].relative_to(folder.root)} cannot be decoded "
                                f"({e})") from None
        out[i] = arr.unsqueeze(0) if channels == 1 else arr.permute(2, 0, 1)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, range(len(files))))
    DECODED[0] += len(files)
    y = torch.tensor([c for _, c in files], dtype=torch.long)
    n = len(folder.train)
    return {"train_x": out[:n].clone(), "train_y": y[:n].clone(), "test_x": out[n:].clone(), "test_y": y[n:].clone(),
            "classes": list(folder.classes)}


def _fit(img, size: int | None):
    """Shorter side to `size`, then the centre `size` x `size` crop (PIL's antialiased bilinear)."""
    if size is None or img.size == (size, size):
        return img
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------------------------- torchvision


def _torchvision(name: str, root: Path, image_size: int | None) -> RawData:
    tv = torchvision()
    cls_name = name.split(":", 1)[1]
    cls = getattr(tv.datasets, cls_name, None)
    if not isinstance(cls, type) or not issubclass(cls, tv.datasets.VisionDataset):
        raise UserError(f"torchvision has no dataset class {cls_name!r} (e.g. CIFAR10, MNIST, FashionMNIST, SVHN, STL10)")
    (x, y, classes), (tx, ty, _) = (_tv_split(cls, cls_name, root, train) for train in (True, False))
    raw = _arrays(name, {"train_x": x, "train_y": y, "test_x": tx, "test_y": ty, "classes": classes}, image_size)
    raw.provenance.update({"data_path": str(root)})
    return raw


def _tv_split(cls, cls_name: str, root: Path, train: bool) -> tuple[Any, Any, Any]:
    """One split of a torchvision dataset: (train=...) or (split="train"/"test"), never downloaded."""
    how = "train=True" if train else "train=False"
    try:
        try:
            ds = cls(str(root), train=train, download=False)
        except TypeError:
            how = f"split={'train' if train else 'test'!r}"
            ds = cls(str(root), split="train" if train else "test", download=False)
    except TypeError:
        raise UserError(f"torchvision:{cls_name} takes neither train= nor split=; load it in your own "
                        f"package.module:function instead") from None
    except Exception as e:  # noqa: BLE001 - torchvision says "not found" as RuntimeError, FileNotFoundError, ...
        raise UserError(f"torchvision dataset {cls_name} ({how}) not found in {root} ({type(e).__name__}); kdsweep never "
                        f"downloads it: run torchvision.datasets.{cls_name}({str(root)!r}, {how}, download=True) once, "
                        f"or pass --data-dir DIR where it is") from None
    classes = getattr(ds, "classes", None)
    data = getattr(ds, "data", None)
    labels = getattr(ds, "targets", None)
    labels = getattr(ds, "labels", None) if labels is None else labels
    import numpy as np

    if data is not None and labels is not None and np.asarray(data).dtype == np.uint8 and len(data) == len(labels):
        return data, labels, classes  # arrays in memory (CIFAR, MNIST, SVHN, STL10...): no decoding
    return (*_decode_items(ds, cls_name), classes)


def _decode_items(ds, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset that yields (PIL image, label) items: decoded one by one (RGB unless all are grayscale)."""
    import numpy as np

    arrays, ys = [], []
    for i in range(len(ds)):
        img, y = ds[i]
        if not hasattr(img, "convert"):
            raise UserError(f"{label} yields {type(img).__name__} items, not PIL images; load it in your own "
                            f"package.module:function instead")
        arrays.append(np.asarray(img.convert("L" if img.mode in GRAY_MODES else "RGB"), dtype=np.uint8))
        ys.append(int(y))
    DECODED[0] += len(arrays)
    if not arrays:
        raise UserError(f"{label} holds no images")
    if len({a.shape[:2] for a in arrays}) > 1:
        raise UserError(f"{label} holds images of different sizes: pass --image-size N to resize them all to NxN")
    rgb = any(a.ndim == 3 for a in arrays)
    arrays = [np.repeat(a[..., None], 3, axis=2) if rgb and a.ndim == 2 else a for a in arrays]
    return torch.from_numpy(np.stack(arrays)), torch.tensor(ys, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- arrays


def _call_source(name: str) -> Any:
    """A registered dataset's data, or what package.module:function returns."""
    if name in _REGISTERED:
        src = _REGISTERED[name]
        return src() if callable(src) else src
    mod_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the console script does not see the cwd's modules
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - a module that is missing or fails while importing
        raise UserError(f"dataset {name}: cannot import {mod_name} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UserError(f"dataset {name}: module {mod_name} has no {attr!r}")
    if not callable(obj):
        raise UserError(f"dataset {name}: {attr} is not a function")
    try:
        return obj()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"dataset {name}: {attr}() raised {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from None


KEYS = ("train_x", "train_y", "test_x", "test_y")


def _arrays(name: str, out: Any, image_size: int | None) -> RawData:
    """Arrays or tensors as RawData: uint8 images, float images or signals, integer labels (rules in docs)."""
    if isinstance(out, dict):
        missing = [k for k in KEYS if k not in out]
        if missing:
            raise UserError(f"dataset {name}: the dict lacks {', '.join(missing)} (needs {', '.join(KEYS)})")
        parts, classes = [out[k] for k in KEYS], out.get("classes")
    elif isinstance(out, (tuple, list)) and len(out) == 4:
        parts, classes = list(out), None
    else:
        raise UserError(f"dataset {name}: expected (train_x, train_y, test_x, test_y) or a dict with those keys, "
                        f"got {type(out).__name__}")
    x, y, tx, ty = parts
    x, tx = _inputs(name, "train_x", x), _inputs(name, "test_x", tx)
    y, ty, names = _class_names(name, y, ty)
    if names is not None:
        classes = names
    y, ty = _labels(name, "train_y", y, len(x)), _labels(name, "test_y", ty, len(tx))
    if image_size is not None:
        if x.dim() != 4:
            raise UserError(f"dataset {name}: --image-size resizes images, and these are signals of shape {tuple(x.shape[1:])}")
        x, tx = resize(x, image_size), resize(tx, image_size)
    if x.shape[1:] != tx.shape[1:]:
        raise UserError(f"dataset {name}: train inputs are {tuple(x.shape[1:])}, test inputs {tuple(tx.shape[1:])}; "
                        f"they must match (or pass --image-size)")
    if len(torch.unique(y)) < 2:
        raise UserError(f"dataset {name}: the training labels hold {len(torch.unique(y))} class; at least two are needed")
    k = int(max(y.max(), ty.max())) + 1
    if isinstance(classes, (list, tuple)) and len(classes) >= k:
        k = len(classes)
    # Class names map to numbers in sorted order; MLflow keeps the map (a param holds at most 6000 characters).
    named = {"class_names": ",".join(map(str, classes))[:5000]} if names is not None else {}
    return RawData(x, y, tx, ty, None, None, k, default_augment(x), named)


def _inputs(name: str, what: str, a: Any) -> torch.Tensor:
    """(N, C, H, W) images or (N, C, L) signals; uint8 kept, floats as float32; channels-last converted."""
    t = torch.as_tensor(a)
    if len(t) == 0:
        raise UserError(f"dataset {name}: {what} is empty")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise UserError(f"dataset {name}: {what} must be uint8 images or floats, got {t.dtype}")
    if not t.is_floating_point():
        if t.dim() == 3:
            t = t.unsqueeze(1)  # (N, H, W) grayscale
    elif t.dim() == 2:
        t = t.unsqueeze(1)  # (N, L) signals
    if t.dim() == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
        t = t.permute(0, 3, 1, 2)  # (N, H, W, C): numpy's and PIL's layout
    if t.dim() not in (3, 4) or (t.dtype == torch.uint8 and t.dim() != 4):
        raise UserError(f"dataset {name}: {what} has shape {tuple(t.shape)}; expected images (N, C, H, W), "
                        f"(N, H, W, C) or (N, H, W), or float signals (N, C, L) or (N, L)")
    if t.is_floating_point():
        bad = ~torch.isfinite(t.reshape(len(t), -1))
        if bad.any():
            raise UserError(f"dataset {name}: {what} holds {int(bad.sum())} non-finite values (NaN or inf) in "
                            f"{int(bad.any(1).sum())} of its {len(t)} samples: clean or drop them before a study")
    return t.float().contiguous() if t.is_floating_point() else t.contiguous()


def _class_names(name: str, y: Any, ty: Any) -> tuple[Any, Any, list[str] | None]:
    """Labels given as names (strings) become class numbers, in sorted order of the names; numbers pass."""
    import numpy as np

    arrays = []
    for what, a in (("train_y", y), ("test_y", ty)):
        arr = None if isinstance(a, torch.Tensor) else np.asarray(a)  # a tensor holds numbers only
        if arr is None or arr.dtype.kind not in "USO":
            return y, ty, None
        if not all(isinstance(v, (str, bytes, np.str_, np.bytes_)) for v in arr.ravel()):
            kinds = sorted({type(v).__name__ for v in arr.ravel()})
            raise UserError(f"dataset {name}: {what} holds {', '.join(kinds)} values; labels are integers 0..K-1 "
                            f"or class names (strings)")
        arrays.append(arr.astype(str))
    names = sorted(set(arrays[0].ravel()) | set(arrays[1].ravel()))
    index = {c: i for i, c in enumerate(names)}
    y, ty = (torch.tensor([index[v] for v in a.ravel()]).reshape(a.shape) for a in arrays)
    return y, ty, names


def _labels(name: str, what: str, a: Any, n: int) -> torch.Tensor:
    t = torch.as_tensor(a)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() != 1 or len(t) != n:
        raise UserError(f"dataset {name}: {what} must be {n} integer class labels (shape ({n},)), got "
                        f"{t.dtype} of shape {tuple(t.shape)}")
    t = t.long()
    if int(t.min()) < 0:
        raise UserError(f"dataset {name}: {what} holds negative labels; classes are 0..K-1")
    return t


def resize(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Images to size x size: shorter side first (antialiased bilinear), then the centre crop; dtype kept."""
    if tuple(x.shape[2:]) == (size, size):
        return x
    h, w = x.shape[2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    out = torch.empty(len(x), x.shape[1], size, size, dtype=x.dtype)
    for i in range(0, len(x), chunk):
        r = F.interpolate(x[i:i + chunk].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        r = r[:, :, top:top + size, left:left + size]
        out[i:i + chunk] = r.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else r
    return out


# ---------------------------------------------------------------------------------------------- memory


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (CUDA: mem_get_info; CPU: MemAvailable); None when it cannot be told."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except Exception:  # noqa: BLE001 - no /proc, no driver: no check
        return None
    return None


def check_fits(nbytes: int, device: torch.device, doing: str = "putting it on the device") -> None:
    """Refuse, in one line, data that would not fit (kdsweep keeps a dataset resident; there is no streaming path)."""
    free = available_bytes(device)
    if free is not None and nbytes > 0.9 * free:
        raise UserError(f"the dataset needs {nbytes / 2**30:.2f} GiB of {device.type} memory for {doing}, and "
                        f"{free / 2**30:.2f} GiB are free: kdsweep keeps a dataset in memory; lower --image-size or "
                        f"--data-size")


def train_digest(raw: RawData) -> str:
    """SHA-256 of the training images and labels as loaded (before the validation slice): the data's identity."""
    from kdsweep.common.digests import tensor_digest

    h = hashlib.sha256()
    for t in (raw.train_x, raw.train_y):
        h.update(tensor_digest(t).encode())
    return h.hexdigest()

