"""Config loading: a partial section keeps ``Config``'s defaults for the keys it leaves out."""

from pathlib import Path

from passray.config import Config, load_config


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
