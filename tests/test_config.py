"""Config loading: composition, overrides, interpolation, and errors that name the bad key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, XLP, xlp_env
from xlp.pipeline.core.config import ConfigError, load_config

DEMO = REPO / "configs" / "demo.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_demo_composes_model_file_and_resolves_interpolation():
    cfg = load_config(DEMO)
    tiny = OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml")
    for key, value in tiny.items():
        assert cfg.model[key] == value, key
    assert cfg.run.dir == "runs/demo"  # ${run.name} resolved
    assert cfg.data.sources == ["stdlib"]
    assert OmegaConf.is_readonly(cfg)


def test_override_order_defaults_file_cli(tmp_path):
    base = write(tmp_path / "base.yaml", "train:\n  steps: 7\n  micro_batch_size: 3\n")
    run = write(tmp_path / "run.yaml", "defaults:\n  - base.yaml\n  - model: tiny\ntrain:\n  steps: 9\nrun:\n  name: x\n")
    cfg = load_config(run, ["train.micro_batch_size=5", "run.dir=/tmp/${run.name}-${train.steps}"])
    assert (cfg.train.steps, cfg.train.micro_batch_size) == (9, 5)
    assert cfg.run.dir == "/tmp/x-9"
    assert base.exists()


def test_group_override_picks_model_file():
    cfg = load_config(DEMO, ["model=xlstm_125m"])
    expected = OmegaConf.load(REPO / "configs" / "model" / "xlstm_125m.yaml")
    assert cfg.model.d_model == expected.d_model and cfg.model.num_blocks == expected.num_blocks
    with pytest.raises(ConfigError, match=r"no model config named 'nope'; available: .*tiny"):
        load_config(DEMO, ["model=nope"])


def test_typo_in_override_names_key_place_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["train.stepz=3"])
    msg = str(e.value)
    assert "`train.stepz`" in msg and "command-line override" in msg and "section `train`" in msg
    assert "steps" in msg and "micro_batch_size" in msg


def test_typo_in_yaml_file_names_the_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "defaults:\n  - model: tiny\ndata:\n  seq_lenn: 128\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "`data.seq_lenn`" in msg and str(bad) in msg and "seq_len" in msg
    top = write(tmp_path / "top.yaml", "trian:\n  steps: 1\n")
    with pytest.raises(ConfigError, match=r"`trian`.*at the top level.*train"):
        load_config(top)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"`train.steps`.*expected int"):
        load_config(DEMO, ["train.steps=many"])
    bad = write(tmp_path / "bad.yaml", "data:\n  val_fraction: lots\n")
    with pytest.raises(ConfigError, match=rf"`data.val_fraction` \(config file {bad}\): expected float"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"`model.slstm_at\[0\]`.*expected int"):
        load_config(DEMO, ["model.slstm_at=[first]"])


def test_bad_values_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"`wandb.mode` is 'loud'; valid values: offline, online, disabled"):
        load_config(DEMO, ["wandb.mode=loud"])
    with pytest.raises(ConfigError, match=r"not key=value"):
        load_config(DEMO, ["train.steps"])
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(write(tmp_path / "broken.yaml", "train: [1,\n"))
    with pytest.raises(ConfigError, match=r"cannot resolve interpolation at run.dir"):
        load_config(DEMO, ["run.dir=${run.nothing}"])


def test_cli_reports_config_errors_and_help():
    env = xlp_env()
    bad = subprocess.run(XLP + ["run", str(DEMO), "train.stepz=3"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "xlp run: error: unknown config key `train.stepz`" in bad.stderr and "Traceback" not in bad.stderr
    for args, words in (
        ([], ["run", "status", "config"]),
        (["run"], ["--stages", "--force", "--run-dir", "key=value", "CONFIG"]),
        (["status"], ["RUN_DIR", "--json", "stale", "pending"]),
    ):
        out = subprocess.run(XLP + args + ["--help"], env=env, capture_output=True, text=True)
        assert out.returncode == 0
        for word in words:
            assert word in out.stdout, (args, word)
    shown = subprocess.run(XLP + ["config", str(DEMO), "train.steps=3"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "steps: 3" in shown.stdout


def test_transformers_imports_beside_our_packages(tmp_path):
    """Our packages live under `xlp.` and leave the bare names to their owners: Hugging Face's `kernels`
    (a transformers dependency) is the one `import kernels` finds, and transformers builds and runs a
    model in a process that imported ours."""
    pytest.importorskip("transformers")
    code = (
        "import importlib.metadata as md, pathlib\n"
        "import xlp.kernels, xlp.tokenizer, xlp.pipeline, xlp.xlstm_model, torch\n"
        "import kernels\n"
        "owner = {str(f) for f in md.files('kernels')}\n"
        "here = pathlib.Path(kernels.__file__)\n"
        "assert any(here.as_posix().endswith(f) for f in owner), ('kernels is not the kernels distribution', here)\n"
        "assert 'xlp' not in here.parts and xlp.kernels.__file__ != kernels.__file__\n"
        "from transformers import AutoModelForCausalLM, GPT2Config\n"
        "m = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,"
        " bos_token_id=0, eos_token_id=0))\n"
        "print(m(torch.randint(0, 64, (1, 5))).logits.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 5, 64])" in out.stdout


def test_group_override_replaces_the_defaults_choice(tmp_path):
    """`model=NAME` replaces the model file a `defaults:` list chose (in an included file too), as
    Hydra's defaults do: no key of the replaced file leaks in, and the file's own keys still apply."""
    write(tmp_path / "base.yaml", "defaults:\n  - model: tiny\n")
    run = write(tmp_path / "run.yaml", "defaults:\n  - base.yaml\nmodel:\n  d_model: 64\n")
    xlstm = load_config(run)
    assert (xlstm.model.arch, list(xlstm.model.slstm_at), xlstm.model.d_model) == ("xlstm", [1], 64)
    llama = load_config(run, ["model=tiny_llama"])
    assert llama.model.arch == "llama"
    assert list(llama.model.slstm_at) == []  # tiny.yaml's sLSTM block did not leak in
    assert llama.model.norm_eps == 1e-6 and llama.model.d_model == 64  # the new file, then the run file
    # a dot-list key after the group still wins
    assert load_config(run, ["model=tiny_llama", "model.d_model=32"]).model.d_model == 32


def test_readme_comparison_command_resolves():
    """README's comparison command, as written there, gives a valid Llama config (it used to fail with
    `model.slstm_at: sLSTM blocks exist only in arch 'xlstm'`). `xlp config` resolves and validates
    exactly what `xlp run` would, without training."""
    import re
    import shlex

    readme = (REPO / "README.md").read_text()
    found = re.search(r"`(xlp run demo model=tiny_llama[^`]*)`", readme)
    assert found, "README no longer shows the comparison command"
    args = shlex.split(found.group(1))[2:]  # after `xlp run`
    out = subprocess.run(XLP + ["config"] + args, env=xlp_env(), capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr  # `demo` is the packaged config: it resolves from any folder
    cfg = OmegaConf.create(out.stdout)
    assert cfg.model.arch == "llama" and list(cfg.model.slstm_at) == []
    assert cfg.run.name == "demo_llama"


def test_list_key_given_one_value_names_the_list_to_write(tmp_path, capsys):
    """`data.sources=/tmp/x` (no brackets) is refused as OmegaConf and Hydra refuse it, but with the key and
    the value written as a list (quoted for the shell); that suggestion, pasted, is accepted. In a file:
    `sources: [/tmp/x]`; null: `[]`."""
    import shlex

    from xlp.pipeline.cli import main as xlp_main

    assert xlp_main(["config", str(DEMO), "data.sources=/tmp/x"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("xlp config: error: config key `data.sources` (command-line override 'data.sources') is a "
                           "list (list[str]), given one value '/tmp/x': write it as a list, 'data.sources=[/tmp/x]'")
    assert xlp_main(["config", str(DEMO), *shlex.split(err.rsplit(", ", 1)[1])]) == 0
    assert "sources:\n  - /tmp/x\n" in capsys.readouterr().out
    bad = write(tmp_path / "bad.yaml", "data:\n  sources: /tmp/x\n")
    with pytest.raises(ConfigError, match=rf"`data.sources` \(config file {bad}\) is a list .* `sources: \[/tmp/x\]`"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"`eval.context_multipliers` .* given one value 2: .*'eval.context_multipliers=\[2\]'"):
        load_config(DEMO, ["eval.context_multipliers=2"])
    with pytest.raises(ConfigError, match=r"`data.sources` .* cannot be null: write \[\] for an empty list"):
        load_config(write(tmp_path / "null.yaml", "data:\n  sources: null\n"))


def test_mixture_clears_or_names_the_inherited_sources(tmp_path, capsys):
    """A mixture config over a base that sets data.sources: the run's log (and `xlp config`) says that
    data.sources is not read; `sources: []` beside the mixture clears it (no note); an empty data.sources
    without a mixture is still refused."""
    from xlp.pipeline.cli import main as xlp_main

    write(tmp_path / "base.yaml", "data:\n  sources: ['stdlib:json']\n")
    mix = "  mixture:\n    web: {sources: ['stdlib:email'], weight: 0.7}\n    code: {sources: ['stdlib:asyncio']}\n"
    kept = write(tmp_path / "kept.yaml", "defaults: [base.yaml]\ndata:\n" + mix)
    cleared = write(tmp_path / "cleared.yaml", "defaults: [base.yaml]\ndata:\n  sources: []\n" + mix)
    note = ("note: data.sources ['stdlib:json'] is not read: the groups of data.mixture (web, code) are the corpus. "
            "`sources: []` beside the mixture under `data:` (or data.sources=[]) clears it")
    # `xlp run`: the note is in the run's log, before anything runs (here the shard stage's missing input stops it)
    assert xlp_main(["run", str(kept), f"run.dir={tmp_path / 'run'}", "--stages", "shard"]) == 1
    out = capsys.readouterr().out
    assert note in out.splitlines(), out
    assert xlp_main(["config", str(kept)]) == 0
    assert note in capsys.readouterr().err.splitlines()
    assert xlp_main(["config", str(cleared)]) == 0
    shown = capsys.readouterr()
    assert "sources: []" in shown.out and "note:" not in shown.err
    assert xlp_main(["config", str(kept), "data.sources=[]"]) == 0 and "note:" not in capsys.readouterr().err
    assert xlp_main(["config", str(DEMO), "data.sources=[]"]) == 1
    assert "data.sources is empty" in capsys.readouterr().err
