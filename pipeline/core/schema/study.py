"""`study.*`: the variants of `xlp study` (xlp.pipeline.study)."""
from __future__ import annotations

from dataclasses import dataclass, field

from xlp.pipeline.core.schema.names import NAME_RE

RESERVED_NAMES = ("data", "report", "wandb")  # and data-*: names in the study directory (StudyLayout)
# keys a variant may not set: the study sets them for each variant
STUDY_OWNED = ("run.name", "run.dir", "wandb.group", "study")


@dataclass
class StudyVariant:
    """One entry of `study.variants`."""

    name: str = ""  # its directory under the study's and its label in the report
    overrides: list[str] = field(default_factory=list)  # applied after the command line's, e.g. [model=tiny_llama]


@dataclass
class StudyConfig:
    """`study.*`: read only by `xlp study` (no stage reads it, so it changes no fingerprint)."""

    variants: list[StudyVariant] = field(default_factory=list)

    def validate(self) -> None:
        seen: dict[str, int] = {}
        for i, v in enumerate(self.variants):
            where = f"study.variants[{i}]"
            if not v.name or not NAME_RE.fullmatch(v.name):
                raise ValueError(f"{where}: name {v.name!r} must be letters, digits, '_', '-', '.' (it names the "
                                 "variant's directory), e.g. name: xlstm_small")
            if v.name in RESERVED_NAMES or v.name.startswith("data-"):
                raise ValueError(f"{where}: name {v.name!r} is reserved in the study directory; pick another")
            if v.name in seen:
                raise ValueError(f"study variant {v.name!r}: the name is used twice (study.variants[{seen[v.name]}] "
                                 f"and [{i}]); variant names must be unique")
            seen[v.name] = i
            for item in v.overrides:
                key = str(item).partition("=")[0]
                if any(key == k or key.startswith(k + ".") for k in STUDY_OWNED):
                    raise ValueError(f"study variant {v.name!r} ({where}): override {item!r} sets `{key}`, which the "
                                     f"study sets for each variant ({', '.join(STUDY_OWNED)}); remove it")
