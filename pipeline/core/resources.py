"""Files that ship inside the package (xlp.configs, xlp.slurm), found through the import system, never
through the source tree: the same code works from a clone (an editable install) and from a wheel.

A config is named by a path to a YAML file, or by its name among the packaged configs: `tiny`,
`demo`, `recipes/xlstm_large_7b`, `studies/xlstm_vs_llama_cpu` (`xlp configs` lists them)."""
from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from xlp.pipeline.core.errors import ConfigError


def package_dir(name: str) -> Path:
    """The folder of one of our data packages (xlp.configs, xlp.slurm), installed or editable."""
    spec = find_spec(name)
    if spec is not None and spec.origin:
        return Path(spec.origin).parent
    folders = [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []
    for folder in folders:
        if folder.is_dir():
            return folder
    raise ConfigError(f"the package {name} is not installed with xlstm-pipeline (reinstall it: pip install -e .)")


def config_dir() -> Path:
    """The packaged configs: run configs, model/, recipes/, studies/, eval/ (lm-eval task files)."""
    return package_dir("xlp.configs")


def sbatch_template() -> Path:
    return package_dir("xlp.slurm") / "pipeline.sbatch"


def packaged_configs() -> list[str]:
    """The names `xlp run NAME` accepts: run configs, recipes and studies (not the model/ and eval/
    groups, which a run config names in its `defaults:` or as `model=NAME`)."""
    root = config_dir()
    names = [p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")]
    return sorted(n for n in names if n.split("/")[0] not in ("model", "eval"))


def resolve_config(name: str | Path) -> Path:
    """A config file: `name` itself when it is a file, else the packaged config of that name."""
    path = Path(name)
    if path.is_file():
        return path
    stem = str(name).removesuffix(".yaml").removesuffix(".yml")
    packaged = config_dir() / f"{stem}.yaml"
    if not path.is_absolute() and ".." not in Path(stem).parts and packaged.is_file():
        return packaged
    raise ConfigError(f"config file not found: {name} (neither a file nor a packaged config; packaged: "
                      f"{', '.join(packaged_configs())}; `xlp configs` lists them)")
