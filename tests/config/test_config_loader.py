"""Tests of the strict config loader on a small self-contained schema (not the real one)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from model.config.loader import (
    ConfigError,
    FieldError,
    config_hash,
    dump_yaml,
    from_dict,
    known_keys,
    load_yaml_file,
    merge_layers,
    parse_dotlist,
    replace_path,
    to_dict,
    unflatten,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ItcCfg:
    weight: float = 1.0
    focal_gamma: float = 0.0
    temp: float = 0.07

    def __post_init__(self) -> None:
        if self.temp <= 0:
            raise FieldError("temp", f"must be > 0, got {self.temp}")


@dataclass(frozen=True)
class LossCfg:
    itc: ItcCfg = field(default_factory=ItcCfg)
    alpha: float = 0.4

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise FieldError("alpha", f"must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class MaskCfg:
    enabled: bool = False
    strategy: Literal["soft", "hard", "random"] = "soft"
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.enabled and self.layer is None:
            raise ValueError("enabled masking needs a layer")


@dataclass(frozen=True)
class DataCfg:
    train_files: tuple[str, ...] = ("coco.json",)
    image_size: tuple[int, float] = (256, 1.0)
    root: Path = Path("data")
    weights: dict[str, float] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrainCfg:
    lr: float = 1e-4
    epochs: int = 30
    num_workers: int = 4
    name: str = "run"


@dataclass(frozen=True)
class RunCfg:
    runs_root: str = "runs"
    tag: str | None = None


@dataclass(frozen=True)
class Cfg:
    loss: LossCfg = field(default_factory=LossCfg)
    mask: MaskCfg = field(default_factory=MaskCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    run: RunCfg = field(default_factory=RunCfg)

    def __post_init__(self) -> None:
        if self.mask.enabled and self.loss.itc.weight == 0:
            raise FieldError("mask", "mask.enabled needs loss.itc.weight > 0")


@dataclass(frozen=True)
class TextCfg:
    vocab_size: int
    hidden: int = 768


@dataclass(frozen=True)
class NeedsText:
    text: TextCfg  # no default: built from its own defaults, so a missing required key shows up


@dataclass(frozen=True)
class Extras:
    head: TextCfg | None = None
    size: int | str = 1


def _errors(cls: type, data: dict, origins: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data, origins)
    return info.value.errors


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- from_dict: keys ----------------------------------------------------------------------------


def test_unknown_key_suggests_sibling_and_names_the_file_that_set_it(tmp_path: Path) -> None:
    base = load_yaml_file(_write(tmp_path / "base.yaml", "loss:\n  itc:\n    weight: 1.0\n"))
    over = load_yaml_file(_write(tmp_path / "g1.yaml", "loss:\n  itc:\n    focal_gama: 1.0\n"))
    merged, origins = merge_layers([("ablations/base.yaml", base),
                                    ("ablations/overrides/focal_g1.yaml", over)])
    assert _errors(Cfg, merged, origins) == [
        "ablations/overrides/focal_g1.yaml: unknown key 'loss.itc.focal_gama' "
        "(did you mean 'loss.itc.focal_gamma'?)"
    ]


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    (error,) = _errors(Cfg, {"train": {"zzz": 1}})
    assert error == ("<defaults>: unknown key 'train.zzz' "
                     "(valid keys under 'train': lr, epochs, num_workers, name)")
    (error,) = _errors(Cfg, {"trian": {}})
    assert "unknown key 'trian' (did you mean 'train'?)" in error


def test_missing_sections_take_defaults_and_required_keys_are_reported() -> None:
    cfg = from_dict(Cfg, {"loss": {"alpha": 0.5}})
    assert cfg.loss == LossCfg(alpha=0.5) and cfg.loss.itc == ItcCfg()
    assert cfg.data == DataCfg() and cfg.train == TrainCfg()
    assert from_dict(NeedsText, {"text": {"vocab_size": 10}}).text == TextCfg(10)
    assert _errors(NeedsText, {}) == ["<defaults>: missing required key 'text.vocab_size'"]


# --- from_dict: types ---------------------------------------------------------------------------


def test_wrong_type_names_file_key_expected_and_got() -> None:
    errors = _errors(Cfg, {"train": {"lr": "abc"}}, {"train.lr": "ablations/base.yaml"})
    assert errors == ["ablations/base.yaml: train.lr: expected float, got str 'abc'"]


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_bool_is_strict(value: object) -> None:
    (error,) = _errors(Cfg, {"mask": {"enabled": value}})
    assert "mask.enabled: expected bool" in error


def test_int_widens_to_float_but_bool_is_not_a_number() -> None:
    cfg = from_dict(Cfg, {"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert _errors(Cfg, {"train": {"lr": True}}) == [
        "<defaults>: train.lr: expected float, got bool True"]
    assert _errors(Cfg, {"train": {"epochs": False}}) == [
        "<defaults>: train.epochs: expected int, got bool False"]
    assert _errors(Cfg, {"train": {"epochs": 1.5}}) == [
        "<defaults>: train.epochs: expected int, got float 1.5"]
    assert "train.name: expected str, got int 7" in _errors(Cfg, {"train": {"name": 7}})[0]


def test_literal_accepts_allowed_values_and_lists_them_otherwise() -> None:
    assert from_dict(Cfg, {"mask": {"strategy": "hard"}}).mask.strategy == "hard"
    assert _errors(Cfg, {"mask": {"strategy": "sofft"}}) == [
        "<defaults>: mask.strategy: must be one of ['soft', 'hard', 'random'], "
        "got str 'sofft' (did you mean 'soft'?)"]


def test_optional_accepts_none_and_non_optional_rejects_it() -> None:
    cfg = from_dict(Cfg, {"mask": {"layer": None}, "run": {"tag": None}})
    assert cfg.mask.layer is None and cfg.run.tag is None
    assert from_dict(Cfg, {"mask": {"layer": 3}}).mask.layer == 3
    assert _errors(Cfg, {"mask": {"layer": "3"}}) == [
        "<defaults>: mask.layer: expected int, got str '3'"]
    assert _errors(Cfg, {"train": {"lr": None}}) == [
        "<defaults>: train.lr: expected float, got None"]


def test_optional_sections_and_wider_unions() -> None:
    assert from_dict(Extras, {}).head is None
    assert from_dict(Extras, {"head": {"vocab_size": 5}}).head == TextCfg(5)
    assert _errors(Extras, {"head": {"hiden": 1}}) == [
        "<defaults>: missing required key 'head.vocab_size'",
        "<defaults>: unknown key 'head.hiden' (did you mean 'head.hidden'?)"]
    assert from_dict(Extras, {"size": "big"}).size == "big"
    assert _errors(Extras, {"size": 1.5}) == [
        "<defaults>: size: expected int | str, got float 1.5"]


def test_sequences_mappings_and_paths() -> None:
    cfg = from_dict(Cfg, {"data": {"train_files": ["a.json", "b.json"], "image_size": [224, 2],
                                   "root": "shared/coco", "weights": {"coco": 1, "vg": 0.5},
                                   "tags": ["x"]}})
    assert cfg.data.train_files == ("a.json", "b.json")
    assert cfg.data.image_size == (224, 2.0) and type(cfg.data.image_size[1]) is float
    assert cfg.data.root == Path("shared/coco")
    assert cfg.data.weights == {"coco": 1.0, "vg": 0.5}
    assert cfg.data.tags == ["x"]
    assert _errors(Cfg, {"data": {"train_files": "a.json"}}) == [
        "<defaults>: data.train_files: expected a list (tuple[str, ...]), got str 'a.json'"]
    assert _errors(Cfg, {"data": {"image_size": [1, 2, 3]}}) == [
        "<defaults>: data.image_size: expected 2 items (tuple[int, float]), got 3"]
    assert _errors(Cfg, {"data": {"train_files": ["a", 2]}}) == [
        "<defaults>: data.train_files[1]: expected str, got int 2"]
    assert _errors(Cfg, {"data": {"weights": {"coco": "x"}}}) == [
        "<defaults>: data.weights.coco: expected float, got str 'x'"]


def test_all_errors_are_reported_together_sorted() -> None:
    origins = {"train.lr": "b.yaml", "mask.enabled": "a.yaml", "loss.itc.focal_gama": "c.yaml"}
    data = {"train": {"lr": "x"}, "mask": {"enabled": "yes"},
            "loss": {"itc": {"focal_gama": 1.0}}, "data": {"tags": [1]}}
    with pytest.raises(ConfigError) as info:
        from_dict(Cfg, data, origins)
    assert len(info.value.errors) == 4
    assert str(info.value).splitlines() == info.value.errors == sorted(info.value.errors)
    assert [e.split(":")[0] for e in info.value.errors] == ["<defaults>", "a.yaml", "b.yaml",
                                                           "c.yaml"]


# --- __post_init__ checks -----------------------------------------------------------------------


def test_field_error_is_reported_with_dotted_key_and_overriding_file(tmp_path: Path) -> None:
    base = load_yaml_file(_write(tmp_path / "base.yaml", "loss:\n  alpha: 0.4\ntrain: {lr: 1}\n"))
    over = load_yaml_file(_write(tmp_path / "o.yaml", "loss:\n  alpha: 1.4\n"))
    merged, origins = merge_layers([("base.yaml", base), ("cell 'x' (matrix.yaml)", over)])
    assert _errors(Cfg, merged, origins) == [
        "cell 'x' (matrix.yaml): loss.alpha must be in [0, 1], got 1.4"]
    assert _errors(Cfg, {"loss": {"itc": {"temp": 0}}}, {"loss.itc.temp": "t.yaml"}) == [
        "t.yaml: loss.itc.temp must be > 0, got 0.0"]


def test_plain_value_error_is_reported_with_section_path_and_origin() -> None:
    errors = _errors(Cfg, {"mask": {"enabled": True}}, {"mask.enabled": "on.yaml"})
    assert errors == ["on.yaml: mask: enabled masking needs a layer"]


def test_self_describing_field_error_is_not_repeated() -> None:
    data = {"mask": {"enabled": True, "layer": 1}, "loss": {"itc": {"weight": 0}}}
    origins = {"mask.enabled": "m.yaml", "mask.layer": "m.yaml", "loss.itc.weight": "w.yaml"}
    assert _errors(Cfg, data, origins) == ["m.yaml: mask.enabled needs loss.itc.weight > 0"]


def test_errors_are_picklable_for_worker_processes() -> None:
    error = pickle.loads(pickle.dumps(ConfigError(["b: x", "a: y"])))
    assert error.errors == ["a: y", "b: x"] and str(error) == "a: y\nb: x"
    field_error = pickle.loads(pickle.dumps(FieldError("alpha", "must be > 0")))
    assert (field_error.field, field_error.message) == ("alpha", "must be > 0")


# --- merging, dotlists, YAML --------------------------------------------------------------------


def test_merge_layers_merges_mappings_replaces_lists_and_tracks_origins() -> None:
    merged, origins = merge_layers([
        ("base", {"loss": {"alpha": 0.1, "itc": {"weight": 2.0}}, "data": {"tags": ["a", "b"]}}),
        ("preset", {"loss": {"itc": {"temp": 0.1}}, "data": {"tags": ["c"]}}),
        ("--set", {"loss": {"alpha": 0.2}}),
    ])
    assert merged == {"loss": {"alpha": 0.2, "itc": {"weight": 2.0, "temp": 0.1}},
                      "data": {"tags": ["c"]}}
    assert origins == {"loss.alpha": "--set", "loss.itc.weight": "base",
                       "loss.itc.temp": "preset", "data.tags": "preset"}


def test_merge_layers_rejects_section_value_clashes_naming_both_sources() -> None:
    with pytest.raises(ConfigError) as info:
        merge_layers([("a.yaml", {"loss": {"alpha": 0.1}, "train": {"lr": 1}}),
                      ("b.yaml", {"loss": 3, "train": {"lr": {"x": 1}}})])
    assert info.value.errors == [
        "b.yaml: 'loss' is a value here (3) but a section in a.yaml",
        "b.yaml: 'train.lr' is a section here but a value (1) in a.yaml",
    ]


def test_merge_layers_lets_null_replace_a_section() -> None:
    merged, origins = merge_layers([("a", {"run": {"tag": "x"}}), ("b", {"run": None}),
                                    ("c", {"run": {"runs_root": "r"}})])
    assert merged == {"run": {"runs_root": "r"}} and origins == {"run.runs_root": "c"}


def test_parse_dotlist_parses_yaml_values() -> None:
    parsed = parse_dotlist(["train.lr=1e-3", "a.b=[1, 2]", "x=null", "y=5E4", "z=2.5",
                            "s=2024-01-01", "flag=true", "eq=k=v", "train.epochs=3"])
    assert parsed == {"train": {"lr": 0.001, "epochs": 3}, "a": {"b": [1, 2]}, "x": None,
                      "y": 50000.0, "z": 2.5, "s": "2024-01-01", "flag": True, "eq": "k=v"}
    assert type(parsed["train"]["lr"]) is float


def test_parse_dotlist_rejects_malformed_items() -> None:
    with pytest.raises(ConfigError) as info:
        parse_dotlist(["novalue", "=3", "a..b=1", "c=[1"], source="cli")
    errors = info.value.errors
    assert "cli: malformed item 'novalue' (expected 'dotted.key=value')" in errors
    assert "cli: malformed item '=3' (expected 'dotted.key=value')" in errors
    assert "cli: malformed key 'a..b' (empty part in dotted key)" in errors
    assert any(e.startswith("cli: cannot parse the value of 'c=[1'") for e in errors)
    clash = r"--set: 'a' is a section here but a value \(1\) in --set"
    with pytest.raises(ConfigError, match=clash):
        parse_dotlist(["a=1", "a.b.c=2"])


def test_unflatten_expands_dotted_mapping_keys() -> None:
    assert unflatten({"train.epochs": 30, "loss.itc": {"weight": 0}}, "cell") == {
        "train": {"epochs": 30}, "loss": {"itc": {"weight": 0}}}


def test_load_yaml_file_edge_cases(tmp_path: Path) -> None:
    assert load_yaml_file(_write(tmp_path / "empty.yaml", "# nothing\n")) == {}
    assert load_yaml_file(_write(tmp_path / "f.yaml", "lr: 1e-3\nd: 2024-01-01\n")) == {
        "lr": 0.001, "d": "2024-01-01"}
    with pytest.raises(ConfigError, match=r"bad\.yaml: line 2, column 5: invalid YAML \(mapping"):
        load_yaml_file(_write(tmp_path / "bad.yaml", "a: 1\nb: c: d\n"))
    with pytest.raises(ConfigError, match=r"list\.yaml: top level must be a mapping.*got list"):
        load_yaml_file(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 3.*duplicate key 'loss'"):
        load_yaml_file(_write(tmp_path / "dup.yaml", "loss: {a: 1}\ntrain: {}\nloss: {b: 2}\n"))
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read config file"):
        load_yaml_file(tmp_path / "missing.yaml")


# --- serialisation, identity, replacement -------------------------------------------------------


def _sample() -> Cfg:
    return from_dict(Cfg, {"loss": {"alpha": 0.3, "itc": {"focal_gamma": 2}},
                           "mask": {"enabled": True, "layer": 2, "strategy": "hard"},
                           "data": {"train_files": ["a.json"], "root": "d", "tags": ["1e-3"],
                                    "weights": {"coco": 1.0}},
                           "run": {"tag": "x"}})


def test_to_dict_round_trip_and_yaml_round_trip(tmp_path: Path) -> None:
    cfg = _sample()
    plain = to_dict(cfg)
    assert plain["data"]["train_files"] == ["a.json"] and plain["data"]["root"] == "d"
    json.dumps(plain)  # JSON-serialisable
    assert from_dict(Cfg, plain) == cfg
    dump_yaml(cfg, tmp_path / "config.yaml")
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left behind
    assert from_dict(Cfg, load_yaml_file(tmp_path / "config.yaml")) == cfg
    text = (tmp_path / "config.yaml").read_text(encoding="utf-8")
    assert text.index("loss:") < text.index("mask:") < text.index("run:")  # schema order


def test_config_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    one = _write(tmp_path / "one.yaml", "train: {lr: 0.001, epochs: 3}\nloss: {alpha: 0.5}\n")
    two = _write(tmp_path / "two.yaml", "loss:\n  alpha: 0.5\ntrain:\n  epochs: 3\n  lr: 1e-3\n")
    h1 = config_hash(from_dict(Cfg, load_yaml_file(one)))
    assert len(h1) == 10 and int(h1, 16) >= 0
    assert h1 == config_hash(from_dict(Cfg, load_yaml_file(two)))
    base = from_dict(Cfg, load_yaml_file(one))
    assert config_hash(replace_path(base, "train.lr", 1)) == config_hash(
        replace_path(base, "train.lr", 1.0))
    assert config_hash(replace_path(base, "loss.alpha", 0.51)) != h1
    assert config_hash(replace_path(base, "data.tags", ["a"])) != h1


def test_config_hash_ignores_excluded_keys() -> None:
    cfg = _sample()
    other = replace_path(replace_path(cfg, "run.runs_root", "elsewhere"), "train.num_workers", 0)
    exclude = ("run", "train.num_workers")
    assert config_hash(cfg) != config_hash(other)
    assert config_hash(cfg, exclude) == config_hash(other, exclude)
    assert config_hash(cfg, exclude) != config_hash(replace_path(cfg, "train.epochs", 1), exclude)
    with pytest.raises(KeyError, match="train.nope"):
        config_hash(cfg, ["train.nope"])


def test_replace_path_validates_and_keeps_the_tree_frozen() -> None:
    cfg = _sample()
    new = replace_path(cfg, "loss.itc.temp", 0.2)
    assert new.loss.itc.temp == 0.2 and cfg.loss.itc.temp == 0.07
    assert new.loss.alpha == cfg.loss.alpha and new.data == cfg.data
    assert replace_path(cfg, "data.train_files", ["x"]).data.train_files == ("x",)
    with pytest.raises(ConfigError, match=r"unknown key 'loss\.itc\.tmp' \(did you mean "):
        replace_path(cfg, "loss.itc.tmp", 0.2)
    with pytest.raises(ConfigError, match="loss.itc.temp: expected float, got str"):
        replace_path(cfg, "loss.itc.temp", "hot")
    with pytest.raises(ConfigError, match=r"loss\.alpha must be in \[0, 1\], got 2\.0"):
        replace_path(cfg, "loss.alpha", 2)
    with pytest.raises(ConfigError, match="mask.enabled needs loss.itc.weight > 0"):
        replace_path(cfg, "loss.itc.weight", 0)  # the root's cross-section check runs too
    with pytest.raises(ConfigError, match="not a section"):
        replace_path(cfg, "train.lr.x", 1)
    for obj, name in ((cfg, "loss"), (new, "train"), (new.loss.itc, "temp")):
        assert dataclasses.is_dataclass(obj)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, None)


def test_known_keys_lists_every_dotted_leaf() -> None:
    keys = known_keys(Cfg)
    assert keys[:4] == ["loss.itc.weight", "loss.itc.focal_gamma", "loss.itc.temp", "loss.alpha"]
    assert "data.weights" in keys and "run.tag" in keys and "loss.itc" not in keys
    assert len(keys) == len(set(keys)) == 18


def test_loader_does_not_import_torch() -> None:
    code = "import sys, model.config.loader; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_yaml_1_1_boolean_words_stay_strings(tmp_path) -> None:
    """`mode: off` must reach a Literal["off", ...] field as the string, not as False."""
    path = tmp_path / "switch.yaml"
    path.write_text("mode: off\nother: yes\nflag: true\n")
    assert load_yaml_file(path) == {"mode": "off", "other": "yes", "flag": True}
    assert parse_dotlist(["a=on", "b=False"]) == {"a": "on", "b": False}


@pytest.mark.parametrize("key, value, expected", [
    ("train.log_every", 0, ">= 1 step"),
    ("train.checkpoint_every", 0, ">= 1 step"),
    ("train.warmup_every", 0, ">= 1 step"),
    ("model.vision.patch_size", 0, ">= 1"),
    ("eval.batch_size", 0, ">= 1"),
    ("train.lr", ".inf", "finite"),
])
def test_counts_that_divide_and_infinite_rates_are_rejected_before_anything_runs(
        key: str, value: object, expected: str) -> None:
    from model.config.experiment import load_experiment

    with pytest.raises(ConfigError, match=expected):
        load_experiment(preset="tiny", sets=[f"{key}={value}"])


@pytest.mark.parametrize("seeds", ["0", "-1", "x"])
def test_run_grid_rejects_a_seed_count_below_one(seeds: str, capsys) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ablations"))
    from run_grid import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--seeds", seeds])
    assert "expected an integer >= 1" in capsys.readouterr().err


def test_a_retired_key_keeps_hashes_and_old_run_configs_load(tmp_path: Path) -> None:
    """softmask.normalize was read by nothing and left the schema; a run folder written before
    still loads, and every run keeps its directory name (the key is hashed at its only value)."""
    import yaml

    from model.config.experiment import experiment_hash, load_experiment
    from model.config.loader import to_dict

    cfg = load_experiment(preset="tiny")
    old = to_dict(cfg)
    old["softmask"]["normalize"] = "minmax"  # a config.yaml as runs wrote it before
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    again = load_experiment([tmp_path / "config.yaml"])
    assert again == cfg and experiment_hash(again) == experiment_hash(cfg)
    # the default grid plans exactly the run ids of the committed results (hashed before)
    from ablations.grid import expand

    raw = Path(__file__).resolve().parents[2] / "results" / "raw" / "softmask_ablation.jsonl"
    committed = {json.loads(line)["run_id"] for line in raw.read_text().splitlines()
                 if json.loads(line).get("record") == "run"}
    assert {s.run_id for s in expand(seeds=[0])} == committed
    old["softmask"]["normalize"] = "zscore"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"bad.yaml.*softmask.normalize' is retired"):
        load_experiment([tmp_path / "bad.yaml"])
