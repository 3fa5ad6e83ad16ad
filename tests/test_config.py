import re
from pathlib import Path

import pytest

from kdsweep.common.errors import UserError
from kdsweep.methods.registry import METHODS
from kdsweep.study.config import resolve, sanitize

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def test_one_shipped_study_file_per_method_and_each_resolves():
    files = {p.stem: p for p in STUDIES.glob("*.toml")}
    assert set(files) == set(METHODS)
    for name in files:
        cfg = resolve(name, {"dataset": "digits"}, studies_dir=STUDIES)
        assert cfg.method == name
        assert set(cfg.space) == set(METHODS[name].space) | {"lr"}


def test_precedence_builtin_then_file_then_flags(tmp_path):
    (tmp_path / "short.toml").write_text(
        'method = "vanilla_kd"\n[defaults]\nepochs = 3\nbatch_size = 16\n'
        "[search]\ntemperature = { low = 2.0, high = 8.0 }\n[fixed]\nalpha = 0.9\n")
    cfg = resolve("short", {"dataset": "digits", "epochs": 7, "batch_size": None}, studies_dir=tmp_path)
    assert cfg.epochs == 7  # the flag wins over the file
    assert cfg.batch_size == 16  # the file wins over the dataset default (32)
    assert cfg.teacher == "digitnet_l" and cfg.student == "digitnet_s"  # the dataset's pair
    assert (cfg.space["temperature"].low, cfg.space["temperature"].high, cfg.space["temperature"].log) == (2.0, 8.0, True)
    assert "alpha" not in cfg.space and cfg.fixed == {"alpha": 0.9}
    assert cfg.full_study_name == "short-digits-digitnet_l-digitnet_s-s0-e7-b16"
    assert cfg.experiment_name == "kdsweep/digits/digitnet_l->digitnet_s"


def test_study_names_are_sanitised():
    # A changed name keeps the safe part and gains a hash of the original: two names never become one.
    assert re.fullmatch(r"etc_passwd-[0-9a-f]{8}", sanitize("../../etc/passwd"))
    assert re.fullmatch(r"my_study_1-[0-9a-f]{8}", sanitize("my study/1"))
    assert sanitize("my study/1") != sanitize("my_study/1") != sanitize("my_study_1") == "my_study_1"
    assert len(sanitize("x" * 300)) == 200 and sanitize("x" * 300) != sanitize("x" * 301)
    for name in ("t", "vanilla_kd-digits-digitnet_l-digitnet_s-s0", "a" * 200, "x.y>z-1"):  # no change needed: kept
        assert sanitize(name) == name
    with pytest.raises(UserError):
        sanitize("///")


def test_every_setting_is_a_flag_of_study_and_sweep():
    # One schema: StudyConfig's fields are the API's keywords, the study file's [defaults] and these flags.
    import argparse

    from kdsweep.api import settings
    from kdsweep.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("study", "sweep"):
        dests = {a.dest for a in sub.choices[command]._actions}
        missing = set(settings()) - dests - ({"study_name"} if command == "sweep" else set())
        assert not missing, f"{command} lacks flags for {sorted(missing)}"
