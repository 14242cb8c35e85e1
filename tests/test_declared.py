"""A stage sees only the config keys it declares (pipeline/core/declared.py): the real stages' views
of a real config, the dataclass sections built from them, and the declarations checked against the
schema. (The runner test test_a_stage_reading_a_key_it_does_not_declare_fails_naming_it runs one.)"""
from __future__ import annotations

import pickle

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xlp.pipeline.core.config import load_config, section
from xlp.pipeline.core.declared import UndeclaredKey
from xlp.pipeline.core.registry import EVAL, SHARD, STAGES, TOKENIZER, TRAIN
from xlp.pipeline.core.resources import resolve_config
from xlp.pipeline.core.schema.data import DataConfig


@pytest.fixture(scope="module")
def cfg():
    return load_config(resolve_config("tiny"), ["data.mixture={web: {sources: [stdlib], weight: 2}}"])


def _undeclared(fn):
    """The UndeclaredKey message fn raises (OmegaConf wraps it when it resolves a masked key)."""
    with pytest.raises((UndeclaredKey, OmegaConfBaseException)) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_declared_key_is_in_the_schema_and_readable_in_the_view(cfg, stage):
    """Each key a stage reads, sees, ignores or continues is a real config key (a typo would
    declare nothing), and reads as the same value through the stage's view as through the config."""
    view = stage.view(cfg)
    for key in stage.reads + stage.sees + stage.ignores + stage.continues:
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", f"{stage.name} declares {key}"
        full, seen = OmegaConf.select(cfg, key), OmegaConf.select(view, key)
        if OmegaConf.is_config(full):
            full, seen = OmegaConf.to_container(full, resolve=True), OmegaConf.to_container(seen, resolve=True)
        assert seen == full, key


@pytest.mark.parametrize("stage,key", [
    (TOKENIZER, "data.seq_len"), (TOKENIZER, "model.d_model"), (SHARD, "tokenizer.vocab_size"),
    (SHARD, "train.steps"), (TRAIN, "eval.batch_size"), (TRAIN, "data.sources"), (TRAIN, "tokenizer.seed"),
    (EVAL, "train.steps"), (EVAL, "data.sources"), (EVAL, "model.d_model"),
], ids=lambda x: getattr(x, "name", x))
def test_a_key_the_stage_does_not_declare_raises_naming_stage_and_key(cfg, stage, key):
    view = stage.view(cfg)
    section_name, _, field = key.partition(".")
    message = _undeclared(lambda: OmegaConf.select(view, key))
    assert f"stage {stage.name!r} read the config key {key}, which it does not declare" in message
    assert f"read the config key {key}," in _undeclared(lambda: getattr(getattr(view, section_name), field))
    assert "does not declare" in _undeclared(lambda: OmegaConf.to_container(view, resolve=True))


def test_a_section_of_a_view_is_its_dataclass_with_the_undeclared_fields_guarded(cfg):
    """The data stages read `data` as a DataConfig: declared fields are the config's values, others raise
    (a pickled copy, as a Ray task gets it, too); the whole config keeps every value."""
    data = section(TOKENIZER.view(cfg), "data")
    assert isinstance(data, DataConfig)
    assert data.sources == list(cfg.data.sources) and data.all_sources() == ["stdlib"]
    assert data.partition_bytes == cfg.data.partition_bytes
    for copy in (data, pickle.loads(pickle.dumps(data))):
        assert isinstance(copy, DataConfig) and copy.format == cfg.data.format
        with pytest.raises(UndeclaredKey, match=r"stage 'tokenizer' read the config key data.seq_len,"):
            copy.seq_len
        with pytest.raises(UndeclaredKey, match=r"stage 'tokenizer' read the config key data.seq_len,"):
            copy.validate()  # reads every field
    train_data = section(TRAIN.view(cfg), "data")
    assert train_data.seq_len == cfg.data.seq_len and train_data.mixture == {"web": {"sources": ["stdlib"], "weight": 2}}
    with pytest.raises(UndeclaredKey, match=r"stage 'train' read the config key data.val_fraction,"):
        train_data.val_fraction
    assert section(cfg, "data").seq_len == cfg.data.seq_len  # the full config: no guard
    assert type(section(cfg, "data")) is DataConfig


def test_the_view_is_read_only_and_leaves_the_config_whole(cfg):
    view = EVAL.view(cfg)
    with pytest.raises(OmegaConfBaseException):
        view.eval.batches = 1
    assert OmegaConf.is_readonly(view)
    assert cfg.train.steps == load_config(resolve_config("tiny"), []).train.steps  # cfg is untouched
