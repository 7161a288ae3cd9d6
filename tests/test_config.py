"""Config loading: a partial section keeps ``Config``'s defaults for the keys it leaves out; nonsense (inf/nan
floats, an empty file) is refused."""

import re
from pathlib import Path
from typing import Iterator, get_args

import pytest
from pydantic import BaseModel

from passray._cli import DEFAULT_CONFIG
from passray.config import Config, ConfigError, load_config


def test_override_of_one_key_keeps_the_sections_other_defaults() -> None:
    cfg, default = load_config(None, ["finetune.distill.weight=0.5", "pretrain.cache=false", "search.lr=0.01"]), Config()
    assert cfg.finetune.distill.weight == 0.5 and cfg.finetune.epochs == default.finetune.epochs
    assert not cfg.pretrain.cache and cfg.pretrain.epochs == default.pretrain.epochs == 0  # no surprise pretraining
    assert cfg.search.lr == 0.01 and cfg.search.optimizer == default.search.optimizer


def test_partial_yaml_section_keeps_the_sections_other_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  lr: 0.1\ntune:\n  space:\n    budget.keep_ratio: {type: uniform, low: 0.2, high: 0.6}\n")
    cfg = load_config(path)
    assert cfg.finetune.lr == 0.1 and cfg.finetune.epochs == Config().finetune.epochs
    assert list(cfg.tune.space) == ["budget.keep_ratio"]  # a space is replaced whole, never merged


def _float_keys(section: BaseModel, prefix: str = "") -> Iterator[str]:
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            yield from _float_keys(value, f"{prefix}{name}.")
        elif field.annotation is float or float in get_args(field.annotation):
            yield f"{prefix}{name}"


FLOAT_KEYS = list(_float_keys(Config()))


def test_the_float_keys_are_found() -> None:
    assert {"hypernet.lr", "model.width", "finetune.distill.temperature", "train.cpus_per_worker"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_inf_and_nan(key: str, value: str) -> None:
    """A bound like gt=0 alone lets .inf through (hypernet.lr=.inf trained on it)."""
    with pytest.raises(ConfigError, match=f"config key '{key}': Input should be a finite number"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_an_empty_config_file_is_refused(text: str, tmp_path: Path) -> None:
    """An empty file used to run the built-in defaults (resnet18, no warning)."""
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{re.escape(f'config file {path} is empty')}$"):
        load_config(path)


def test_the_embedded_default_still_loads() -> None:
    """What a run without --config reads (tune_configs/quickstart.yaml) is not empty."""
    assert load_config(DEFAULT_CONFIG).model.arch == "convnet"
