"""The recipes users submit as they are (configs/recipes/*.yaml): each resolves through the real CLI to
what it says, names the corpus as the one key the user must give, renders its sbatch script, and trains
on the tokens per parameter its comments claim."""
from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, XLP, xlp_env
from xlp.pipeline.core.config import ConfigError, load_config

RECIPE_DIR = REPO / "configs" / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))
# pretraining recipes: the model from configs/model/, the corpus the one key to give
PRETRAIN = [p for p in RECIPES if not p.stem.startswith("continue_")]
CONTINUE = RECIPE_DIR / "continue_xlstm_7b.yaml"
CORPUS = ["/shared/corpus/*.jsonl"]
SOURCES = "data.sources=[" + ",".join(CORPUS) + "]"

# keys every recipe sets itself (not left to the dataclass defaults)
RECIPE_KEYS = (
    "data.sources", "data.seq_len", "train.steps", "train.micro_batch_size", "train.grad_accum", "train.lr",
    "train.warmup", "train.schedule", "train.precision", "train.zero_stage", "train.save_every",
    "wandb.mode", "wandb.project", "slurm.nodes", "slurm.gpus_per_node", "slurm.cpus_per_task", "slurm.time",
)


def read(path):
    return yaml.safe_load(path.read_text())


def flat(d: dict, prefix: str = "") -> dict:
    """{dotted key: leaf value} of a nested mapping (lists are leaves)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def model_of(recipe) -> str:
    (entry,) = [e for e in read(recipe)["defaults"] if isinstance(e, dict) and "model" in e]
    return entry["model"]


def xlp_config(*args) -> subprocess.CompletedProcess:
    return subprocess.run(XLP + ["config", *map(str, args)], env=xlp_env(), capture_output=True, text=True,
                          timeout=300)


def test_the_recipes_are_there():
    assert {p.stem for p in RECIPES} >= {"xlstm_large_400m", "llama_400m", "xlstm_large_1.3b", "xlstm_large_7b",
                                         "continue_xlstm_7b"}
    assert (RECIPE_DIR / "README.md").is_file()
    readme = (RECIPE_DIR / "README.md").read_text()
    for p in RECIPES:
        assert p.name in readme, f"configs/recipes/README.md does not list {p.name}"


@pytest.mark.parametrize("recipe", PRETRAIN, ids=lambda p: p.stem)
def test_recipe_resolves_through_the_cli_to_what_it_says(recipe):
    proc = xlp_config(recipe, SOURCES)
    assert proc.returncode == 0, proc.stderr
    got = flat(yaml.safe_load(proc.stdout))

    raw = read(recipe)
    raw.pop("defaults")
    expected = {f"model.{k}": v for k, v in read(REPO / "configs" / "model" / f"{model_of(recipe)}.yaml").items()}
    expected.update(flat(raw))  # the recipe's own keys win over its model file
    expected["data.sources"] = CORPUS
    for key in RECIPE_KEYS:
        assert key in flat(raw), f"{recipe.name} leaves `{key}` to the defaults"
    for key, value in expected.items():
        assert got[key] == value, f"{recipe.name}: `{key}` resolved to {got[key]!r}, the recipe says {value!r}"

    assert got["train.schedule"] == ("exp" if recipe.stem == "xlstm_large_7b" else "wsd")  # the 7B paper's
    assert got["train.precision"] == "bf16"
    assert got["slurm.gpus_per_node"] == 8
    assert got["model.arch"] == ("llama" if recipe.stem.startswith("llama") else "xlstm_large")
    if recipe.stem == "xlstm_large_7b":
        assert got["train.zero_stage"] == 3 and got["slurm.nodes"] > 1
    if recipe.stem == "xlstm_large_1.3b":
        assert got["slurm.nodes"] == 4
    if recipe.stem.endswith("400m"):
        assert got["slurm.nodes"] == 1


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_without_a_corpus_names_the_missing_key(recipe):
    assert read(recipe)["data"]["sources"] == "???"
    proc = xlp_config(recipe)
    assert proc.returncode == 1, f"resolved without data.sources:\n{proc.stdout[:500]}"
    assert "Traceback" not in proc.stderr
    assert "`data.sources`" in proc.stderr and "data.sources=[" in proc.stderr, proc.stderr


@pytest.mark.parametrize("recipe", PRETRAIN, ids=lambda p: p.stem)
def test_recipe_sbatch_renders_its_allocation(recipe, tmp_path):
    from xlp.pipeline.cluster.submit import render_sbatch

    slurm = read(recipe)["slurm"]
    cfg = load_config(recipe, [SOURCES])
    script = render_sbatch(cfg, config=tmp_path / "config.yaml", run_dir=tmp_path / "run", only=None, force=False)
    lines = script.splitlines()
    assert f"#SBATCH --nodes={slurm['nodes']}" in lines
    assert f"#SBATCH --gpus-per-node={slurm['gpus_per_node']}" in lines
    assert "#SBATCH --gpus-per-node=8" in lines
    assert f"#SBATCH --cpus-per-task={slurm['cpus_per_task']}" in lines
    assert f"#SBATCH --time={slurm['time']}" in lines


@pytest.mark.parametrize("recipe", PRETRAIN, ids=lambda p: p.stem)
def test_recipe_trains_on_about_20_tokens_per_parameter(recipe):
    """The token budget in the recipes' comments, from the project's own parameter count."""
    from xlp.xlstm_model import count_params

    cfg = load_config(recipe, [SOURCES])
    params = count_params(OmegaConf.to_object(cfg.model))  # built on the meta device: no memory, seconds
    t, s = cfg.train, cfg.slurm
    tokens = t.steps * t.micro_batch_size * t.grad_accum * s.nodes * s.gpus_per_node * cfg.data.seq_len
    assert tokens / params == pytest.approx(20, rel=0.15), f"{recipe.name}: {tokens:,} tokens for {params:,} parameters"
    # the header's numbers are the real ones
    header = recipe.read_text()
    assert f"{params:,} parameters" in header
    assert f"{tokens:,} tokens" in header


def test_the_400m_recipes_differ_only_in_the_model():
    xl, ll = (flat(read(RECIPE_DIR / f"{n}_400m.yaml")) for n in ("xlstm_large", "llama"))
    differ = {k for k in xl.keys() | ll.keys() if xl.get(k) != ll.get(k)}
    assert differ == {"defaults", "run.name", "wandb.tags"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_value_carries_a_comment(recipe):
    for n, line in enumerate(recipe.read_text().splitlines(), 1):
        if line.lstrip().startswith("#") or not line.strip():
            continue
        key, sep, value = line.partition(":")
        if sep and value.strip() and not value.strip().startswith("#"):
            assert "#" in value, f"{recipe.name}:{n}: `{line.strip()}` has no comment giving its reason"


def test_a_mandatory_value_is_not_filled_in_by_a_default(tmp_path):
    """`???` merged over a dataclass default stays missing (OmegaConf keeps the default on merge)."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  sources: ???\ntrain:\n  steps: ???\n")
    with pytest.raises(ConfigError, match=re.escape("`data.sources`, `train.steps`")):
        load_config(cfg_file)
    with pytest.raises(ConfigError, match="`train.steps`"):
        load_config(cfg_file, ["data.sources=[a.txt]"])
    cfg = load_config(cfg_file, ["data.sources=[a.txt]", "train.steps=7"])
    assert list(cfg.data.sources) == ["a.txt"] and cfg.train.steps == 7
    with pytest.raises(ConfigError, match="`train.steps`"):
        load_config(REPO / "configs" / "demo.yaml", ["train.steps=???"])


def test_the_continue_recipe_takes_its_model_from_the_checkpoint(tmp_path):
    """continue_xlstm_7b.yaml: the checkpoint, its tokenizer and the corpus are what the user gives; the model
    comes from the checkpoint's config.json (here a small one in the transformers format), the optimizer and
    schedule are the xLSTM 7B paper's, and it renders its 16-node allocation."""
    import torch

    from xlp.pipeline.cluster.submit import render_sbatch
    from xlp.xlstm_model import ModelConfig, build_model
    from xlp.xlstm_model.hf import save_hf

    proc = xlp_config(CONTINUE, SOURCES)
    assert proc.returncode == 1 and "`model.init_from`" in proc.stderr and "`tokenizer.path`" in proc.stderr, proc.stderr
    cfg = ModelConfig(arch="xlstm_large", vocab_size=512, d_model=128, num_blocks=2, num_heads=4, tie_weights=False)
    torch.manual_seed(0)
    save_hf(build_model(cfg), cfg, tmp_path / "ckpt")
    given = [SOURCES, f"model.init_from=hf:{tmp_path / 'ckpt'}", f"tokenizer.path={tmp_path / 'ckpt'}"]
    proc = xlp_config(CONTINUE, *given)
    assert proc.returncode == 0, proc.stderr
    got = flat(yaml.safe_load(proc.stdout))
    assert (got["model.arch"], got["model.d_model"], got["model.num_blocks"], got["model.vocab_size"]) == \
        ("xlstm_large", 128, 2, 512)
    assert got["model.activation_checkpointing"] is True  # the recipe's, not the checkpoint's
    assert got["train.schedule"] == "exp" and got["train.betas"] == [0.99, 0.95] and got["train.grad_clip"] == 0.5
    assert got["train.zero_stage"] == 3 and got["train.precision"] == "bf16"
    raw = flat(read(CONTINUE))
    for key in RECIPE_KEYS + ("train.betas", "train.grad_clip", "model.init_from"):
        assert key in raw, f"{CONTINUE.name} leaves `{key}` to the defaults"
    t, s = load_config(CONTINUE, given).train, read(CONTINUE)["slurm"]
    tokens = t.steps * t.micro_batch_size * t.grad_accum * s["nodes"] * s["gpus_per_node"] * 8192
    assert f"{tokens:,} tokens" in CONTINUE.read_text()
    script = render_sbatch(load_config(CONTINUE, given), config=tmp_path / "config.yaml", run_dir=tmp_path / "run",
                           only=None, force=False)
    assert "#SBATCH --nodes=16" in script.splitlines()
