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
    for name, path in files.items():
        cfg = resolve(str(path), {"dataset": "digits"})
        assert cfg.method == name
        assert set(cfg.space) == set(METHODS[name].space) | {"lr"}


def test_precedence_builtin_then_file_then_flags(tmp_path):
    (tmp_path / "short.toml").write_text(
        'method = "vanilla_kd"\n[defaults]\nepochs = 3\nbatch_size = 16\n'
        "[search]\ntemperature = { low = 2.0, high = 8.0 }\n[fixed]\nalpha = 0.9\n")
    cfg = resolve(str(tmp_path / "short.toml"), {"dataset": "digits", "epochs": 7, "batch_size": None})
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


def test_flags_choices_defaults_and_help_come_from_the_schema():
    # Issue 19: choices were declared in config.py and again as literal choices=[...] in cli.py, and defaults
    # were restated in help strings; now the study flags are built from the schema's fields.
    import argparse
    import dataclasses
    from pathlib import Path

    from kdsweep.cli import build_parser
    from kdsweep.study import settings as schema
    from kdsweep.study.config import StudyConfig

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in sub.choices["study"]._actions}
    for f in schema.schema():
        a = actions[f.name]
        assert a.option_strings[0] == schema.flag(f.name) and a.default is None  # unset flags leave the file's value
        assert a.choices == (list(f.metadata["choices"]) if f.metadata["choices"] else None), f.name
        assert a.help == schema.help_text(f) and a.help.startswith(f.metadata["help"]), f.name
        if schema.kind(f.name) is bool:
            assert isinstance(a, argparse.BooleanOptionalAction), f.name
        else:
            assert a.type is schema.kind(f.name), f.name
        if f.default is not None:  # a concrete default is said once, by the schema, in the words help_text derives
            assert a.help.endswith(f"(default: {schema.default_text(f)})"), f.name
    # StudyConfig is the schema plus what the method and file decide: the same fields, the same defaults.
    config = {f.name: f.default for f in dataclasses.fields(StudyConfig)}
    assert all(config[f.name] == f.default for f in schema.schema())
    assert set(config) - set(schema.names()) == {"method", "name", "study_file", "space", "fixed"}
    # The command line declares no setting's choices or default itself.
    cli = (Path(schema.__file__).parents[1] / "cli.py").read_text()
    for f in schema.schema():
        for choices in filter(None, [f.metadata["choices"]]):
            assert f"choices={list(choices)!r}".replace("'", '"') not in cli, f.name
    assert "(default: 0.1)" not in cli and "default: tpe" not in cli and "default: median" not in cli


def test_the_schema_checks_choices_and_bounds_in_one_line(tmp_path):
    from kdsweep.study import settings as schema

    ok = schema.StudySettings()
    schema.check(ok)
    for kw, message in [({"sampler": "grid"}, "unknown sampler 'grid'; choose from tpe, random"),
                        ({"on_mismatch": "x"}, "unknown --on-mismatch 'x'; choose from refuse, repair, ignore"),
                        ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'; choose from sgd, adam, adamw"),
                        ({"trials": 0}, "--trials must be at least 1, got 0"),
                        ({"data_size": 9}, "--data-size must be at least 10, got 9"),
                        ({"val_fraction": 1.0}, "--val-fraction must be in (0, 1), got 1.0"),
                        ({"timeout": 0.0}, "--timeout must be greater than 0, got 0.0"),
                        ({"teacher_cache_mb": float("nan")}, "--teacher-cache-mb must be at least 0, got nan"),
                        ({"cpu_workers": -1}, "--cpu-workers must be at least 0, got -1")]:
        with pytest.raises(UserError) as e:
            schema.check(schema.StudySettings(**kw))
        assert str(e.value) == message


def _restated(doc: dict) -> list[str]:
    """The [search] entries of a study file whose range is the method's own (lr: any optimiser's range)."""
    from kdsweep.common.space import LR_RANGES, apply_overrides

    space = {**METHODS[doc["method"]].space, "lr": LR_RANGES["sgd"]}
    out = []
    for name, spec in doc.get("search", {}).items():
        merged, _ = apply_overrides(space, {name: spec}, {})
        ranges = LR_RANGES.values() if name == "lr" else [space[name]]
        if any((merged[name].low, merged[name].high, merged[name].log) == (r.low, r.high, r.log) for r in ranges):
            out.append(name)
    return out


def test_study_files_carry_only_what_they_change():
    # Search ranges live in the method classes: a study file restating one would drift from it unseen.
    import tomllib

    for path in sorted(STUDIES.glob("*.toml")):
        text = path.read_text()
        doc = tomllib.loads(text)
        assert not _restated(doc), f"{path.name} restates the method's range of {_restated(doc)}"
        assert METHODS[doc["method"]].summary in text.splitlines()[0]
        # The commented [search] example, uncommented, is a change (not the method's range) that resolves.
        lines = text.splitlines()
        example = lines[lines.index("# [search]          # a range to search instead of the method's, e.g.") + 1]
        changed = tomllib.loads(f'method = "{doc["method"]}"\n[search]\n{example[2:]}\n')
        assert changed["search"] and not _restated(changed), example
    # The check is not vacuous: a planted restatement (whole or partial) is found, a change is not.
    planted = {"method": "vanilla_kd", "search": {"temperature": {"low": 1.0, "high": 100.0, "log": True},
                                                  "alpha": {"high": 1.0}, "lr": {"low": 1e-4, "high": 0.1, "log": True}}}
    assert _restated(planted) == ["temperature", "alpha", "lr"]
    assert _restated({"method": "vanilla_kd", "search": {"temperature": {"low": 2.0}}}) == []


def test_a_bare_name_is_the_method_whatever_the_current_directory_holds(kdsweep, workdir, monkeypatch):
    # Issue 19: `kdsweep study vanilla_kd` read ./studies/vanilla_kd.toml; one saying method = "ce" ran ce
    # and the report labelled it vanilla_kd.
    from kdsweep.study import loop

    (workdir / "studies").mkdir()
    (workdir / "studies" / "vanilla_kd.toml").write_text('method = "ce"\n[defaults]\nepochs = 2\n')
    cfg = resolve("vanilla_kd", {"dataset": "digits"})
    assert (cfg.method, cfg.name, cfg.epochs) == ("vanilla_kd", "vanilla_kd", 10)  # the file is not read
    assert {k: (v.low, v.high, v.log) for k, v in cfg.space.items() if k != "lr"} == {
        k: (v.low, v.high, v.log) for k, v in METHODS["vanilla_kd"].space.items()}

    def stop(cfg, **_):  # what the command would run, without training it
        raise UserError(f"would run {cfg.method} as {cfg.full_study_name}")

    monkeypatch.setattr(loop, "run_study", stop)
    code, _, err = kdsweep("study", "vanilla_kd", "--dataset", "digits", "--trials", 1)
    assert code == 2 and err.strip() == "kdsweep: error: would run vanilla_kd as vanilla_kd-digits-digitnet_l-digitnet_s-s0-e10-b32"
    # The file by its path: named after one method, running another: refused in one line, nothing run.
    code, _, err = kdsweep("study", "studies/vanilla_kd.toml", "--dataset", "digits", "--trials", 1)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("kdsweep: error: study file studies/vanilla_kd.toml is named after the method vanilla_kd "
                          "but says method = 'ce'")
    # A file of another name labels its own study; a bare name that is no method points at the file.
    (workdir / "studies" / "mine.toml").write_text('method = "ce"\n')
    code, _, err = kdsweep("study", "studies/mine.toml", "--dataset", "digits", "--trials", 1)
    assert code == 2 and err.strip() == "kdsweep: error: would run ce as mine-digits-digitnet_l-digitnet_s-s0-e10-b32"
    code, _, err = kdsweep("study", "mine", "--dataset", "digits")
    assert code == 2 and "unknown method 'mine'" in err and err.strip().endswith(
        "; a study file is given by its path: kdsweep study studies/mine.toml")
    # The command a study's MLflow note gives to resume it names the file by the path it was given.
    from kdsweep.tracking.notes import resume_command

    assert resume_command(resolve("studies/mine.toml", {"dataset": "digits"})).startswith(
        "kdsweep study studies/mine.toml --dataset digits ")
    assert resume_command(resolve("ce", {"dataset": "digits"})).startswith("kdsweep study ce --dataset digits ")
