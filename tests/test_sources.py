"""Datasets from anywhere (sources.py): image folders, torchvision classes, the user's function, registered tensors."""

from __future__ import annotations

import os
import struct
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from kdsweep.common.errors import UserError
from kdsweep.data import dispatch, sources
from kdsweep.data.builtin import Augment, RawData
from kdsweep.data.device_data import DeviceData
from kdsweep.data.dispatch import get_dataset, load_data
from kdsweep.study.config import StudyConfig

CPU = torch.device("cpu")
PAIR = ["--teacher", "digitnet_l", "--student", "digitnet_s"]
TINY = ["--trials", "1", "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "8", "--val-fraction", "0.25"]


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """Each test: its own data dir (decode cache) and no data resolved by an earlier test."""
    monkeypatch.setenv("KDSWEEP_DATA", str(tmp_path / "data"))
    sources._MEMO.clear()
    yield
    sources._MEMO.clear()
    sources._REGISTERED.clear()


def make_folder(root, classes=3, n=12, size=16, test_dir="test", mode="RGB", sizes=None):
    """PNGs whose class is a bright channel (learnable); `sizes` cycles image sizes per file."""
    rng = np.random.default_rng(0)
    for split, k in (("train", n), (test_dir, max(2, n // 3))):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(k):
                s = sizes[i % len(sizes)] if sizes else size
                a = rng.integers(0, 60, (s, s, 3), dtype=np.uint8)
                a[..., c % 3] += 150
                Image.fromarray(a).convert(mode).save(d / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------- image folders


def test_imagefolder_study_confirm_report_and_provenance(kdsweep, workdir):
    folder = make_folder(workdir / "shapes")
    code, out, err = kdsweep("study", "vanilla_kd", "--dataset", "imagefolder:shapes", *PAIR, *TINY, "--trials", "2", "-q")
    assert code == 0, err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    from kdsweep.data.sources import name_tag

    # Named short (the folder's name and a digest of its path, issue 22); the pair's tags hold the path whole.
    exp = client.get_experiment_by_name(f"kdsweep/{name_tag(f'imagefolder:{folder}')}/digitnet_l->digitnet_s")
    assert str(folder) not in exp.name and exp.tags["kdsweep.dataset"] == f"imagefolder:{folder}"
    parent = client.search_runs([exp.experiment_id], "tags.`kdsweep.role` = 'study'")[0]
    p = parent.data.params
    assert p["dataset"] == f"imagefolder:{folder}" and p["data_source"] == "imagefolder"
    assert (p["data_classes"], p["data_files"], p["in_shape"], p["image_size"]) == ("3", "48", "3x16x16", "")
    assert len(p["train_sha256"]) == 64 and len(p["split_sha256"]) == 64 and p["train_sha256"] != p["split_sha256"]
    assert len(p["norm_mean"].split(",")) == 3
    # From another directory, by its absolute path: confirm and report rebuild the same split.
    os.chdir(workdir)
    code, out, err = kdsweep("confirm", "--seeds", "1", "--dataset", f"imagefolder:{folder}")
    assert code == 0 and "vanilla_kd: 0 reused, 1 trained, 0 failed" in out + err, out + err
    code, out, err = kdsweep("report", "--format", "md", "--out", "rep", "--no-plots")
    assert code == 0 and "vanilla_kd" in (workdir / "rep" / "report.md").read_text(), err


def test_a_store_holding_the_older_long_experiment_name_keeps_using_it(kdsweep, workdir):
    """Stores written before issue 22 name a folder's experiment by its whole path: studies go on landing there."""
    from mlflow.tracking import MlflowClient

    folder = make_folder(workdir / "old")
    (workdir / "mlruns").mkdir()
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    legacy = f"kdsweep/imagefolder:{folder}/digitnet_l->digitnet_s"
    old = client.create_experiment(legacy)
    code, out, err = kdsweep("study", "ce", "--dataset", "imagefolder:old", *PAIR, *TINY, "-q")
    assert code == 0, err
    assert [e.name for e in client.search_experiments() if e.name.startswith("kdsweep/")] == [legacy]
    assert client.search_runs([old], "tags.`kdsweep.role` = 'study'")
    code, out, err = kdsweep("report", "--format", "md", "--out", "rep", "--no-plots")  # found by its pair's tags
    assert code == 0 and "| ce" in (workdir / "rep" / "report.md").read_text(), err


def test_second_load_reads_the_disk_cache_and_a_changed_file_decodes_again(tmp_path):
    folder = make_folder(tmp_path / "f", n=6)
    spec = f"imagefolder:{folder}"
    before = sources.DECODED[0]
    first = sources.resolve(spec, None, None)
    assert sources.DECODED[0] - before == 3 * (6 + 2)
    cached = list((tmp_path / "data" / "cache").glob("*.pt"))
    assert len(cached) == 1 and not list((tmp_path / "data" / "cache").glob("*.tmp"))
    sources._MEMO.clear()  # as a new process would
    second = sources.resolve(spec, None, None)
    assert sources.DECODED[0] - before == 24  # nothing decoded
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "train" / "c0" / "0.png")
    os.utime(folder / "train" / "c0" / "0.png", ns=(1, 1))  # another mtime, whatever the clock's resolution
    sources._MEMO.clear()
    third = sources.resolve(spec, None, None)
    assert sources.DECODED[0] - before == 48 and not torch.equal(first.train_x, third.train_x)


def test_image_size_resizes_mixed_sizes_and_channels(tmp_path):
    folder = make_folder(tmp_path / "mixed", n=4, sizes=[16, 24])
    with pytest.raises(UserError, match=r"different sizes \(16x16 in .*, 24x24 in .*\): pass --image-size"):
        sources.resolve(f"imagefolder:{folder}", None, None)
    raw = sources.resolve(f"imagefolder:{folder}", None, 8)
    assert raw.train_x.shape == (12, 3, 8, 8) and raw.train_x.dtype == torch.uint8
    cfg = StudyConfig(method="ce", name="ce", dataset=f"imagefolder:{folder}", image_size=8,
                      teacher="digitnet_l", student="digitnet_s")
    assert cfg.budget_tag.endswith("-i8") and cfg.fingerprint()["image_size"] == 8
    gray = make_folder(tmp_path / "gray", n=4, mode="L")
    assert sources.resolve(f"imagefolder:{gray}", None, None).train_x.shape[1] == 1  # all grayscale: one channel
    make_folder(gray, n=1, classes=1, mode="RGB")  # one colour image among them: all become RGB
    sources._MEMO.clear()
    assert sources.resolve(f"imagefolder:{gray}", None, None).train_x.shape[1] == 3


def test_val_folder_serves_as_test_and_augment_follows_size(tmp_path):
    small = sources.resolve(f"imagefolder:{make_folder(tmp_path / 'v', n=4, test_dir='val')}", None, None)
    assert len(small.test_y) == 3 * 2 and small.augment == Augment()
    big = sources.resolve(f"imagefolder:{make_folder(tmp_path / 'b', n=2, size=32)}", None, None)
    assert big.augment == Augment(pad=4, flip=True)


def test_normalisation_comes_from_the_training_split_only():
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    x[:10] = 0  # whatever lands in val must not move the statistics
    raw = RawData(x, torch.arange(40) % 2, x[:4], torch.arange(4) % 2, None, None, 2, Augment())
    d = DeviceData(raw, 0, 0.25, CPU)
    t = d.train_x.double() / 255
    assert d.mean == pytest.approx(t.mean((0, 2, 3)).tolist(), abs=1e-5)
    assert d.std == pytest.approx(t.std((0, 2, 3), unbiased=False).tolist(), abs=1e-5)
    whole = x.double().div(255).mean((0, 2, 3))
    assert not torch.allclose(torch.tensor(d.mean, dtype=torch.float64), whole, atol=1e-3)
    assert d.normalize(d.train_x).double().mean((0, 2, 3)).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------- torchvision


def _idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes())


def test_torchvision_mnist_from_data_dir(tmp_path):
    raw_dir = tmp_path / "tv" / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 12)):
        _idx(raw_dir / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw_dir / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    cfg = StudyConfig(method="ce", name="ce", dataset="torchvision:MNIST", data_dir=str(tmp_path / "tv"), image_size=14,
                      teacher="digitnet_l", student="digitnet_s")
    d = load_data(cfg.dataset, cfg.data_dir, None, 0, 0.25, CPU, image_size=cfg.image_size)
    assert d.in_shape == (1, 14, 14) and d.num_classes == 10 and len(d.test_y) == 12
    assert d.provenance["data_source"] == "torchvision" and d.provenance["data_path"] == str(tmp_path / "tv")
    with pytest.raises(UserError, match=r"torchvision dataset MNIST \(train=True\) not found in .*never downloads"):
        sources.resolve("torchvision:MNIST", tmp_path / "empty", None)
    with pytest.raises(UserError, match="torchvision has no dataset class 'NoSuchSet'"):
        sources.resolve("torchvision:NoSuchSet", tmp_path, None)


# ---------------------------------------------------------------------------------------------- the user's data


def test_module_function_numpy_channels_last_and_signals(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(textwrap.dedent("""
        import numpy as np
        rng = np.random.default_rng(0)
        def images():  # numpy's (N, H, W, C) uint8
            return (rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8), np.arange(30) % 3,
                    rng.integers(0, 256, (9, 12, 12, 3), dtype=np.uint8), np.arange(9) % 3)
        def signals():
            return {"train_x": rng.normal(size=(30, 40)), "train_y": np.arange(30) % 2,
                    "test_x": rng.normal(size=(6, 40)), "test_y": np.arange(6) % 2}
        def broken():
            raise ValueError("no such table")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = sources.resolve("mydata:images", None, None)
    assert raw.train_x.shape == (30, 3, 12, 12) and raw.train_x.dtype == torch.uint8 and raw.num_classes == 3
    assert sources.resolve("mydata:images", None, 8).train_x.shape == (30, 3, 8, 8)
    sig = sources.resolve("mydata:signals", None, None)
    assert sig.train_x.shape == (30, 1, 40) and sig.train_x.dtype == torch.float32 and sig.augment == Augment()
    cfg = StudyConfig(method="ce", name="ce", dataset="mydata:signals", teacher="cnn1d", student="mlp100")
    assert cfg.full_study_name.startswith("ce-mydata.signals-cnn1d-mlp100-")
    with pytest.raises(UserError, match=r"dataset mydata:broken: broken\(\) raised ValueError: no such table"):
        sources.resolve("mydata:broken", None, None)
    with pytest.raises(UserError, match="--image-size resizes images"):
        sources.resolve("mydata:signals", None, 8)


def test_registered_tensors_work_as_a_dataset_name():
    x = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    dispatch.register("mine", (x, torch.arange(40) % 4, x[:8], torch.arange(8) % 4))  # the API's hook
    cfg = StudyConfig(method="ce", name="ce", dataset="mine", teacher="digitnet_l", student="digitnet_s")
    assert get_dataset("mine").teacher == "" and cfg.full_study_name.startswith("ce-mine-")
    d = load_data("mine", None, None, 0, 0.25, CPU)
    assert d.num_classes == 4 and d.in_shape == (1, 8, 8) and d.provenance["data_source"] == "registered"
    sources.register("mine", lambda: (x, torch.arange(40) % 2, x[:8], torch.arange(8) % 2))  # replaced, not memoised
    assert load_data("mine", None, None, 0, 0.25, CPU).num_classes == 2
    with pytest.raises(UserError, match="is a built-in dataset"):
        sources.register("digits", (x, x, x, x))


def test_a_set_too_large_for_memory_is_refused_before_it_is_put_there(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "f", n=4)
    monkeypatch.setattr(sources, "available_bytes", lambda device: 1000)
    with pytest.raises(UserError, match=r"needs 0.00 GiB of cpu memory .* free: kdsweep keeps a dataset in memory"):
        load_data(f"imagefolder:{folder}", None, None, 0, 0.25, CPU)


# ---------------------------------------------------------------------------------------------- bad input


def _nothing_written(workdir):
    import optuna

    db = workdir / "mlruns" / "optuna.db"
    if db.exists():
        assert optuna.get_all_study_names(f"sqlite:///{db}") == []
    if (workdir / "mlruns" / "mlflow.db").exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def _bad_folders(root):
    (root / "empty" / "train" / "a").mkdir(parents=True)
    (root / "empty" / "test" / "a").mkdir(parents=True)
    make_folder(root / "one", classes=1, n=3)
    make_folder(root / "notimg", n=2)
    (root / "notimg" / "train" / "c1" / "notes.txt").write_text("not a picture")
    make_folder(root / "broken", n=2)
    (root / "broken" / "train" / "c2" / "bad.png").write_bytes(b"\x89PNG but not really")
    make_folder(root / "notest", n=2, test_dir="holdout")
    make_folder(root / "mixed", n=2, sizes=[16, 20])


@pytest.mark.parametrize("args, expect", [
    (["imagefolder:empty"], "empty holds no images under train/"),
    (["imagefolder:one"], "one has one class (c0) with images under train/: at least two are needed"),
    (["imagefolder:notimg"], "train/c1/notes.txt is not an image (1 such file"),
    (["imagefolder:broken"], "train/c2/bad.png cannot be read as an image"),
    (["imagefolder:notest"], "no test/ or val/ folder beside train/"),
    (["imagefolder:missing"], "missing: no such directory"),
    (["imagefolder:mixed"], "holds images of different sizes (16x16 in train/c0/0.png, 20x20 in train/c0/1.png): pass --image-size"),
    (["torchvision:CIFAR10", "--data-dir", "nowhere"], "torchvision dataset CIFAR10 (train=True) not found in"),
    (["no_such_module:make"], "dataset no_such_module:make: cannot import no_such_module (ModuleNotFoundError"),
    (["digits", "--image-size", "16"], "--image-size resizes imagefolder:, torchvision: and module datasets; digits"),
])
def test_bad_data_is_one_line_exit_2_and_writes_nothing(kdsweep, workdir, args, expect, tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("teachers")
    monkeypatch.setenv("KDSWEEP_CACHE", str(cache))
    _bad_folders(workdir)
    code, out, err = kdsweep("study", "vanilla_kd", "--dataset", *args, *PAIR, *TINY)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("kdsweep: error: "), err
    assert expect in lines[0], lines[0]
    _nothing_written(workdir)
    assert not any(cache.rglob("*.pt"))  # no teacher
    assert not (workdir / "data" / "cache").exists() or not any((workdir / "data" / "cache").iterdir())


def test_a_spec_without_teacher_and_student_is_refused(kdsweep, workdir):
    make_folder(workdir / "f", n=2)
    code, out, err = kdsweep("study", "ce", "--dataset", "imagefolder:f", "--student", "digitnet_s", *TINY)
    assert code == 2 and f"dataset imagefolder:{workdir / 'f'} has no default teacher and student: pass --teacher and --student" in err
    _nothing_written(workdir)


def test_teacher_command_on_a_spec_asks_for_arch(kdsweep, workdir):
    make_folder(workdir / "f")
    code, out, err = kdsweep("teacher", "--dataset", "imagefolder:f")
    assert code == 2 and "pass --arch" in err and len(err.strip().splitlines()) == 1


def test_datasets_live_in_the_cache_folder_unless_kdsweep_data_says_otherwise(tmp_path, monkeypatch):
    """Seen by a new user: with $KDSWEEP_CACHE set, datasets still went to ~/.cache/kdsweep/data (the README
    says the variable moves the whole cache). $KDSWEEP_DATA moves the datasets alone."""
    from kdsweep.data.builtin import default_data_dir

    monkeypatch.delenv("KDSWEEP_DATA")
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "data"
    assert sources.cache_file("imagefolder:x", "0" * 16).parent == tmp_path / "cache" / "data" / "cache"
    monkeypatch.setenv("KDSWEEP_DATA", str(tmp_path / "data"))
    assert default_data_dir() == tmp_path / "data"
