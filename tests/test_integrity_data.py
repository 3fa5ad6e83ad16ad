"""Attacks with the user's own data: values that are not numbers, labels given as names, images too large to
decode, and a teacher that diverges. Each is one line (exit 2) before anything is trained or written, or works."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from kdsweep.common.errors import UserError
from kdsweep.data import sources
from kdsweep.data.dispatch import load_data

PAIR = ["--teacher", "digitnet_l", "--student", "digitnet_s"]
TINY = ["--trials", "1", "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "8", "--val-fraction", "0.25"]


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSWEEP_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "teachers"))
    sources._MEMO.clear()
    yield
    sources._MEMO.clear()
    sources._REGISTERED.clear()


def _module(workdir, monkeypatch, body: str) -> None:
    """The user's module `userdata`, new for each test (not the one an earlier test imported)."""
    (workdir / "userdata.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(workdir))
    monkeypatch.delitem(sys.modules, "userdata", raising=False)


def _one_line_and_nothing_trained(code, err, expect, workdir):
    import optuna

    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expect in lines[0], err
    assert not list((workdir / "teachers").rglob("*.pt"))  # KDSWEEP_CACHE: no teacher trained
    db = workdir / "mlruns" / "optuna.db"
    assert not db.exists() or optuna.get_all_study_names(f"sqlite:///{db}") == []


@pytest.mark.parametrize("split, expect", [("train", "train_x holds 3 non-finite values (NaN or inf) in 2 of its 40"),
                                           ("test", "test_x holds 3 non-finite values (NaN or inf) in 2 of its 16")])
def test_non_finite_inputs_are_named_by_split_before_a_teacher_trains(kdsweep, workdir, monkeypatch, split, expect):
    """Attack: NaN in the inputs made every trial fail NonFiniteLoss and then 'a narrower lr range may help';
    NaN only in the test split gave trials a test accuracy with no warning."""
    _module(workdir, monkeypatch, f"""
        import numpy as np

        def make():
            rng = np.random.default_rng(0)
            x, tx = rng.normal(size=(40, 1, 8, 8)).astype("float32"), rng.normal(size=(16, 1, 8, 8)).astype("float32")
            bad = x if "{split}" == "train" else tx
            bad[0, 0, 0, 0] = np.nan
            bad[1, 0, 0, :2] = np.inf
            return x, np.arange(40) % 2, tx, np.arange(16) % 2
    """)
    code, _, err = kdsweep("study", "vanilla_kd", "--dataset", "userdata:make", *PAIR, *TINY)
    assert code == 2 and expect in err
    _one_line_and_nothing_trained(code, err, expect, workdir)


def test_labels_given_as_names_become_classes_in_sorted_order():
    """Attack: string labels from a module:function source gave a traceback (a list) or blamed a study option."""
    x = torch.randn(12, 1, 8, 8)
    names = ["dog", "cat", "emu"] * 4
    sources.register("named", (x, names, x[:6], np.array(["emu", "cat", "dog", "cat", "dog", "emu"])))
    data = load_data("named", None, None, 0, 0.25, torch.device("cpu"))
    assert data.num_classes == 3 and data.provenance["class_names"] == "cat,dog,emu"
    assert data.test_y.tolist() == [2, 0, 1, 0, 1, 2]
    sources._MEMO.clear()
    sources.register("mixed", (x, np.array(["dog", 1.5] * 6, dtype=object), x[:6], ["dog"] * 6))
    with pytest.raises(UserError, match="train_y holds float, str values; labels are integers 0..K-1 or class names"):
        load_data("mixed", None, None, 0, 0.25, torch.device("cpu"))


def test_an_image_too_large_to_decode_is_one_line_naming_it(kdsweep, workdir, monkeypatch):
    """Attack: an oversized PNG (20000x20000) ended in PIL's DecompressionBombError traceback. The limit is
    lowered here so that a 64x64 image stands for it; raised again, the same folder works."""
    for split, n in (("train", 4), ("test", 2)):
        for c in range(2):
            (workdir / "f" / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((64, 64), 60 + 150 * c, np.uint8)).save(workdir / "f" / split / f"c{c}" / f"{i}.png")
    monkeypatch.setenv("KDSWEEP_MAX_IMAGE_PIXELS", "1000")
    code, _, err = kdsweep("study", "vanilla_kd", "--dataset", "imagefolder:f", *PAIR, *TINY)
    _one_line_and_nothing_trained(code, err, "train/c0/0.png is too large to decode safely (Image size (4096 pixels)", workdir)
    assert "KDSWEEP_MAX_IMAGE_PIXELS" in err
    monkeypatch.setenv("KDSWEEP_MAX_IMAGE_PIXELS", "100000")
    sources._MEMO.clear()
    assert load_data("imagefolder:f", None, None, 0, 0.25, torch.device("cpu"), image_size=8).num_classes == 2


def test_a_teacher_that_diverges_is_one_line(kdsweep, workdir, monkeypatch):
    """Attack: a teacher model whose outputs are NaN ended in a NonFiniteLoss traceback, exit 1."""
    _module(workdir, monkeypatch, """
        import torch
        from torch import nn

        class NaNHead(nn.Module):
            def __init__(self, num_classes):
                super().__init__()
                self.fc = nn.Linear(64, num_classes)

            def forward(self, x):
                return self.fc(x.flatten(1)) * float("nan")

        def teacher(num_classes):
            return NaNHead(num_classes)
    """)
    code, _, err = kdsweep("study", "vanilla_kd", "--dataset", "digits", "--data-size", "300", "--teacher",
                           "userdata:teacher", "--student", "digitnet_s", *TINY)
    lines = err.strip().splitlines()
    assert code == 2 and "the teacher userdata:teacher diverged while training on digits" in lines[-1], err
    assert "Traceback" not in err
