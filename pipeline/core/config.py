"""The pipeline's config: OmegaConf structured configs built from the dataclasses next to each part.

Loading a run config:
  1. defaults from the dataclasses (PipelineConfig below),
  2. the YAML file, after its `defaults:` list has been composed in, e.g.
         defaults:
           - model: tiny          # configs/model/tiny.yaml merged under `model`
           - base.yaml            # another file merged at the top level
  3. overrides from the command line: `model=xlstm_125m` picks a group file and *replaces* the one the
     `defaults:` list chose (as Hydra's defaults do: no key of the replaced file survives), then
     dot-list items (`train.steps=10`) are merged over everything,
  4. `${...}` interpolations resolved, then each section validated.
Unknown keys and wrong types fail with the key, where it came from, and what is valid there.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from xlp.kernels.config import KernelsConfig
from xlp.pipeline.core.declared import section_object
from xlp.pipeline.core.errors import ConfigError
from xlp.pipeline.core.resources import config_dir, resolve_config
from xlp.pipeline.core.schema.data import DataConfig
from xlp.pipeline.core.schema.eval import EvalConfig
from xlp.pipeline.core.schema.names import check_name, check_no_control
from xlp.pipeline.core.schema.slurm import SlurmConfig
from xlp.pipeline.core.schema.study import StudyConfig
from xlp.pipeline.core.schema.tokenizer import TokenizerConfig
from xlp.pipeline.core.schema.train import TrainConfig
from xlp.pipeline.core.schema.wandb import WandbConfig
from xlp.xlstm_model.config import DecodeConfig, ModelConfig
from xlp.xlstm_model.hf_config import checkpoint_model_keys, disagreements

CONFIG_DIR = config_dir()  # the packaged configs (xlp.configs)
# Config groups: a `defaults:` entry or a CLI override `group=name` picks configs/<group>/<name>.yaml.
GROUPS = ("model",)


@dataclass
class RunConfig:
    name: str = "demo"
    dir: str = "runs/${run.name}"  # RUN_DIR: stage outputs, stage.json markers, the resolved config
    seed: int = 0

    def validate(self) -> None:
        # run.name becomes a directory, the Slurm job's name and a line of its sbatch script
        check_name("run.name", self.name, names="the run directory, the Slurm job and the W&B run",
                   example="run.name=tiny_v2")
        check_no_control("run.dir", self.dir, "it is a path, written into the sbatch script")


@dataclass
class PipelineConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    study: StudyConfig = field(default_factory=StudyConfig)  # `xlp study` only (pipeline/study/)



CHOICES = {
    "wandb.mode": ("offline", "online", "disabled"),
}


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                model_from_checkpoint: bool = True) -> DictConfig:
    """The validated, resolved config of a run: defaults <- YAML file <- overrides. With
    `model.init_from=hf:DIR`, the model's architecture keys then come from DIR/config.json
    (model_from_checkpoint; see take_model_from_checkpoint)."""
    cfg = OmegaConf.structured(PipelineConfig)
    if path is not None:
        path = resolve_config(path)  # a file, or a packaged config's name (`tiny`, `recipes/xlstm_large_7b`)
    group_overrides, dot_overrides = split_overrides(overrides)
    choices = dict(group_overrides)  # the last `model=...` wins, as for any key
    chosen: set[str] = set()  # the groups a `defaults:` entry named (and so were replaced there)
    if path is not None:
        merge_into(cfg, compose_file(path, choices=choices, chosen=chosen), f"config file {path}")
    for group, name in choices.items():
        if group not in chosen:  # no `defaults:` entry to replace: merged over the file, as before
            merge_into(cfg, {group: read_yaml(group_file(group, name, CONFIG_DIR))}, f"override {group}={name}")
    for item in dot_overrides:
        key, _, value = item.partition("=")
        merge_into(cfg, parse_override(item), f"command-line override {key!r}")
    if model_from_checkpoint:
        take_model_from_checkpoint(cfg, [item.partition("=")[0] for item in dot_overrides])
    return finalize(cfg)


def take_model_from_checkpoint(cfg: DictConfig, override_keys: list[str]) -> None:
    """`model.init_from=hf:DIR`: the model keys the checkpoint decides (architecture, sizes, vocabulary,
    untied head, soft caps: xlp.xlstm_model.hf_config.CHECKPOINT_KEYS) are set from DIR/config.json, over
    the config file's (a `defaults:` model group included), so the user does not copy them. A model.* key
    given on the command line that describes another network is refused, naming both values."""
    try:
        spec = OmegaConf.select(cfg, "model.init_from", throw_on_missing=False)
    except OmegaConfBaseException:
        return  # an interpolation that does not resolve: finalize() names it
    if not isinstance(spec, str) or not spec.startswith("hf:") or len(spec) == 3:
        return
    try:
        keys = checkpoint_model_keys(spec[3:])
    except ValueError as e:  # HFConversionError: no config.json, not JSON, an option we cannot express
        raise ConfigError(f"model.init_from={spec}: {e}") from None
    given = {k.removeprefix("model."): cfg.model[k.removeprefix("model.")] for k in override_keys
             if k.startswith("model.") and k.removeprefix("model.") in keys}
    given = {k: list(v) if isinstance(v, ListConfig) else v for k, v in given.items()}
    conflicts = disagreements(keys, given)
    if conflicts:
        raise ConfigError(
            f"model.init_from={spec}: the model's architecture comes from {Path(spec[3:]) / 'config.json'}, and "
            f"the command line disagrees with it: {'; '.join(conflicts)}. Drop these overrides (the checkpoint "
            "decides them), or start from another checkpoint")
    merge_into(cfg, {"model": keys}, f"model.init_from={spec} ({Path(spec[3:]) / 'config.json'})")


# RUN_DIR/config.yaml: the resolved config `xlp run` saves and the training ranks, `xlp status`, export
# and generate read back. It starts with RUN_CONFIG_HEAD and ends with the sha256 of everything before
# its last line, so a truncated or damaged file is an error naming it instead of a config whose missing
# keys silently take their defaults. A file without the head (written before 2026-12, or by hand) is
# read as it is.
RUN_CONFIG_HEAD = ("# written by `xlp run`: the resolved config of this run directory, which its training ranks "
                   "read; the last line is the sha256 of the lines before it\n")
RUN_CONFIG_TAIL = "# sha256: "
_TAIL_RE = re.compile(r"[0-9a-f]{64}\n?")


def seal_run_config(text: str) -> str:
    """`text` (a resolved config as YAML) as RUN_DIR/config.yaml holds it: the head, then a sha256 line."""
    body = RUN_CONFIG_HEAD + text if text.endswith("\n") else RUN_CONFIG_HEAD + text + "\n"
    return f"{body}{RUN_CONFIG_TAIL}{hashlib.sha256(body.encode()).hexdigest()}\n"


def read_run_config(path: str | Path) -> str:
    """The text of a run directory's config.yaml, checked whole when `xlp run` sealed it (seal_run_config);
    ConfigError naming the file, what is wrong, and how to write it again."""
    path = Path(path)
    fix = (f"run `xlp run CONFIG --run-dir {path.parent}` with the run's config and overrides again: it writes "
           "the file first, and the stages that are done stay done")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path.parent} is not a run directory (no {path.name} in it)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the run's config: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        what = "damaged" if raw.startswith(RUN_CONFIG_HEAD.encode()) else "not UTF-8 text"
        raise ConfigError(f"{path} is {what} (byte 0x{raw[e.start]:02x} at offset {e.start} is not UTF-8); "
                          f"{fix}") from None
    if not text.startswith(RUN_CONFIG_HEAD):
        return text
    body, tail_sep, digest = text.rpartition(RUN_CONFIG_TAIL)
    if not tail_sep or not _TAIL_RE.fullmatch(digest):
        raise ConfigError(f"{path} is truncated: it does not end with the sha256 line `xlp run` writes "
                          f"last ({len(raw)} bytes); {fix}")
    actual = hashlib.sha256(body.encode()).hexdigest()
    if actual != digest.strip():
        raise ConfigError(f"{path} is damaged or was edited: the sha256 of its lines is {actual[:12]}..., its "
                          f"last line says {digest.strip()[:12]}...; {fix}")
    return text


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """A run directory's config.yaml (checked: read_run_config) as load_config loads any config file."""
    read_run_config(path)
    # the run's model section already holds what `xlp run` took from a model.init_from checkpoint: the run
    # dir stays readable (status, generate, export) after that checkpoint has moved
    return load_config(Path(path), overrides, model_from_checkpoint=False)


def parse_override(item: str) -> DictConfig:
    """A `key=value` override as a config; the value is read as YAML (`[a, b]`, `3`, `"text"`). A value
    YAML cannot read (one starting with a backtick, '@' or '%', an unclosed quote or bracket) is a
    ConfigError naming the key, not a parser's traceback."""
    key, _, value = item.partition("=")
    try:
        return OmegaConf.from_dotlist([item])
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        said = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"command-line override {key!r}: the value {value!r} is not valid YAML ({said}); "
                          f"if it is text, quote it for YAML inside the shell's quotes, e.g. '{key}=\"text\"'") from None


def finalize(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations, check the values, and make the config read-only."""
    missing = sorted(_missing_keys(cfg))
    if missing:
        example = "data.sources=[/path/to/corpus/*.jsonl]" if "data.sources" in missing else f"{missing[0]}=VALUE"
        raise ConfigError(
            f"mandatory config key not set (??? in the config): {', '.join(f'`{k}`' for k in missing)}; "
            f"give it on the command line, e.g. {example}"
        )
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve interpolation at {_key_of(e)}: {_msg_of(e)}") from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def split_overrides(overrides) -> tuple[list[tuple[str, str]], list[str]]:
    groups, dots = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not key=value (e.g. train.steps=10, model=xlstm_125m)"
            )
        key, _, value = item.partition("=")
        if key in GROUPS and value and not value.startswith("{"):
            groups.append((key, value))
        else:
            dots.append(item)
    return groups, dots


def read_yaml(path: Path) -> dict:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          "save the config file as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def group_file(group: str, name: str, base_dir: Path) -> Path:
    for directory in (base_dir / group, CONFIG_DIR / group):
        candidate = directory / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    raise ConfigError(f"no {group} config named {name!r}; available: {', '.join(available) or 'none'}")


def compose_file(path: Path, _seen: tuple[Path, ...] = (), *, choices: dict[str, str] | None = None,
                 chosen: set[str] | None = None) -> DictConfig:
    """The YAML file with its `defaults:` list merged in (entries first, the file's own keys last).

    choices: {group: name} from the command line; a `group: x` entry in any `defaults:` list (this
    file's or an included file's) picks `name` instead of `x`, so the replaced file is never read.
    chosen: filled with the groups that such an entry named."""
    choices = {} if choices is None else choices
    chosen = set() if chosen is None else chosen
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"config files include each other: {' -> '.join(map(str, _seen + (path,)))}")
    data = read_yaml(path)
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: `defaults` must be a list, e.g. [{{model: tiny}}, base.yaml]")
    merged = OmegaConf.create()
    for entry in defaults:
        if isinstance(entry, dict) and len(entry) == 1:
            (group, name), = entry.items()
            if group not in GROUPS:
                raise ConfigError(f"{path}: defaults entry {entry}: unknown group {group!r}; groups: {', '.join(GROUPS)}")
            if group in choices:
                name = choices[group]
                chosen.add(group)
            part = OmegaConf.create({group: read_yaml(group_file(group, str(name), path.parent))})
        elif isinstance(entry, str):
            part = compose_file(path.parent / entry, _seen + (path,), choices=choices, chosen=chosen)
        else:
            raise ConfigError(f"{path}: defaults entry {entry!r} must be `group: name` or a file name")
        merged = OmegaConf.merge(merged, part)
    return OmegaConf.merge(merged, OmegaConf.create(data))


def merge_into(cfg: DictConfig, update: Any, source: str) -> None:
    """Merge `update` into the structured `cfg`, turning OmegaConf's errors into ones users can act on."""
    try:
        cfg.merge_with(update)
    except ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(cfg, e, source)) from None
    except ValidationError as e:
        raise ConfigError(_type_message(cfg, e, source, update)) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_key_of(e)}: {_msg_of(e)}") from None
    # A `???` (mandatory) value does not replace a default when merged: mark it missing here, so that
    # finalize() names the key the user must set instead of the run silently using the default.
    for key in _missing_keys(update):
        OmegaConf.update(cfg, key, "???", merge=False)


def _missing_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is `???` (OmegaConf's MISSING); interpolations are not resolved."""
    if isinstance(data, (DictConfig, ListConfig)):
        data = OmegaConf.to_container(data, resolve=False)
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    keys = []
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(data, list) else f"{prefix}.{k}" if prefix else str(k)
        keys += [key] if isinstance(v, str) and v == "???" else _missing_keys(v, key)
    return keys


def _key_of(e: OmegaConfBaseException) -> str:
    return getattr(e, "full_key", None) or str(getattr(e, "key", "?"))


def _msg_of(e: OmegaConfBaseException) -> str:
    return str(e).split("\n")[0]


def _parent_node(cfg: DictConfig, full_key: str) -> tuple[str, Any]:
    parent_key = full_key.rpartition(".")[0]
    node = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    return parent_key, node


def _unknown_key_message(cfg: DictConfig, e: ConfigKeyError, source: str) -> str:
    full_key = _key_of(e)
    parent_key, node = _parent_node(cfg, full_key)
    where = f"in section `{parent_key}`" if parent_key else "at the top level"
    valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
    return (
        f"unknown config key `{full_key}` ({source}), {where}. "
        f"Valid keys there: {', '.join(valid)}"
    )


def _type_message(cfg: DictConfig, e: ValidationError, source: str, update: Any = None) -> str:
    full_key = _key_of(e)
    expected = _expected_type(full_key)
    given = _given_value(update, full_key)
    if typing.get_origin(_declared_type(full_key)) in (list, tuple) and not isinstance(given, (list, tuple, dict)):
        return _list_message(full_key, expected, given, source)
    value = getattr(e, "msg", str(e)).split("\n")[0]
    return f"wrong type for config key `{full_key}` ({source}): expected {expected}. ({value})"


_UNSET = object()


def _given_value(update: Any, full_key: str) -> Any:
    """The value `update` gives `full_key` (dotted), or _UNSET."""
    node = OmegaConf.to_container(update, resolve=False) if isinstance(update, DictConfig) else update
    for part in full_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _UNSET
        node = node[part]
    return node


def _list_message(full_key: str, expected: str, given: Any, source: str) -> str:
    """A list-typed key given one value (`data.sources=/tmp/x`): refused, as OmegaConf and Hydra refuse
    it, with the value written as a list to copy. Not wrapped silently: `a,b` would become one path, and
    the same key in a file and on the command line would mean different things."""
    if given is _UNSET:
        return f"config key `{full_key}` ({source}) is a list ({expected}): write its value in brackets, e.g. [a, b]"
    if given is None:
        return (f"config key `{full_key}` ({source}) is a list ({expected}) and cannot be null: "
                f"write [] for an empty list")
    text = str(given)
    leaf = full_key.rpartition(".")[2]
    if source.startswith("command-line"):
        # quoted for the shell: zsh stops at unmatched brackets, bash may expand them as a glob
        fix = shlex.quote(f"{full_key}=[{text}]")
    else:
        fix = f"`{leaf}: [{text}]`"
    return f"config key `{full_key}` ({source}) is a list ({expected}), given one value {given!r}: write it as a list, {fix}"


def _expected_type(full_key: str) -> str:
    """The declared type of a key, read from the dataclasses (e.g. `int`, `Optional[str]`)."""
    typ = _declared_type(full_key)
    if typ is None:
        return "a different type"
    return getattr(typ, "__name__", None) if isinstance(typ, type) else str(typ).replace("typing.", "")


def _declared_type(full_key: str) -> Any:
    """The declared type of a key (a typing object), or None when no dataclass declares it."""
    cls: Any = PipelineConfig
    typ: Any = None
    for part in full_key.split("."):
        name, _, index = part.partition("[")
        if not dataclasses.is_dataclass(cls):
            break
        hints = typing.get_type_hints(cls)
        if name not in hints:
            break
        typ = cls = hints[name]
        if index and typing.get_args(typ):  # an element of a list
            typ = cls = typing.get_args(typ)[0]
    return typ


# ---------------------------------------------------------------------------------------------
# Validation of values (types are checked by OmegaConf on merge)


def validate(cfg: DictConfig) -> None:
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key `{key}` is {value!r}; valid values: {', '.join(choices)}")
    for section in ("run", "data", "tokenizer", "model", "train", "eval", "kernels", "decode", "slurm", "study"):
        obj = OmegaConf.to_object(cfg[section])
        check = getattr(obj, "validate", None)
        if check is not None:
            try:
                check()
            except (ValueError, TypeError) as e:
                raise ConfigError(str(e)) from None
    sp = int(cfg.train.sequence_parallel)
    if sp > 1:  # what the sections cannot see alone (the ranks check the world when they start)
        error = OmegaConf.to_object(cfg.model).sequence_parallel_error(sp)
        if error:
            raise ConfigError(error)
        if cfg.train.compile and cfg.model.activation_checkpointing:
            raise ConfigError(
                f"train.compile=true with train.sequence_parallel={sp} and model.activation_checkpointing=true: the "
                "state exchange is a graph break in each block, and Dynamo runs a checkpointed block with a graph "
                "break inside it eagerly (nothing of it compiled); use model.activation_checkpointing=false, or "
                "train.compile=false")
        if int(cfg.data.seq_len) % sp:
            raise ConfigError(f"train.sequence_parallel={sp} does not divide data.seq_len={cfg.data.seq_len}: every "
                              f"rank of a group holds seq_len / sequence_parallel tokens of each row; use a "
                              f"data.seq_len divisible by {sp}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def section(cfg: DictConfig, name: str):
    """A config section as its dataclass (e.g. `section(cfg, "model")` -> ModelConfig). In a stage's
    view of the config (Stage.view), the fields it does not declare raise UndeclaredKey when read."""
    return section_object(cfg[name], name + ".")
