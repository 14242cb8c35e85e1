"""Secrets stay out of what a run writes and logs (pipeline/core/secrets.py), and bad inputs fail with one
line naming the file.

The end-to-end tests plant WANDB_API_KEY, HF_TOKEN and a credentialed source URL, run the tiny
pipeline (locally, and as a Ray job whose ranks are Ray Train workers) and search every byte of the
run directory and of Ray's session directory for them. The credentialed URL is a realistic source
that the pipeline handles but cannot read here: `ftp://reader:<password>@127.0.0.1:<closed port>/...`
given as `${oc.env:XLP_TEST_SOURCE}` in data.sources, with data.on_error=skip, so the readers try it,
count it and list it as skipped (its name lands in metrics, stats.json, manifest.json, the configs).
"""
from __future__ import annotations

import os
import secrets as pysecrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, XLP, xlp_env
from xlp.pipeline.core.config import ConfigError, load_config, read_yaml
from xlp.pipeline.core.secrets import env_references, is_secret, is_secret_name, redact, secret_keys

TINY = REPO / "configs" / "tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# redaction


def test_redact_masks_url_credentials_and_token_parameters():
    assert redact("https://bob:pa55word@host/x.jsonl") == "https://***@host/x.jsonl"
    assert redact("s3://bucket/key?X-Amz-Signature=abc123&part=1") == "s3://bucket/key?X-Amz-Signature=***&part=1"
    assert redact("https://h/x?sig=zzz") == "https://h/x?sig=***"
    assert redact({"a": ["ftp://u:p@h/f", 3], "ok": "s3://bucket/key"}) == {"a": ["ftp://***@h/f", 3],
                                                                          "ok": "s3://bucket/key"}
    assert redact("/plain/path.jsonl") == "/plain/path.jsonl"
    assert redact("notes: abcdefgh1234", env={"MY_TOKEN": "abcdefgh1234"}) == "notes: ***"
    assert is_secret_name("WANDB_API_KEY") and is_secret_name("HF_TOKEN") and is_secret_name("DB_PASSWORD")
    assert not is_secret_name("WANDB_MODE")
    assert is_secret("XLP_SOURCE", "https://u:p@h/x") and not is_secret("XLP_SOURCE", "https://h/x")


def test_submitted_config_keeps_env_references_and_refuses_literal_credentials(tmp_path, monkeypatch):
    """The config `xlp submit` saves: submit_slurm and submit_ray write submitted_config()'s text to its
    path (atomic_write_text), and stop at submitted_config() when the config holds a credential."""
    import io

    from xlp.pipeline.core.stage import atomic_write_text
    from xlp.pipeline.cluster.submit import SubmitError, submit_ray, submit_slurm, submitted_config

    pw = pysecrets.token_hex(8)
    monkeypatch.setenv("XLP_TEST_SOURCE", f"ftp://reader:{pw}@127.0.0.1:1/corpus.jsonl")
    cfg = load_config(TINY, ["data.sources=['stdlib:json','${oc.env:XLP_TEST_SOURCE}']"])
    path, text = submitted_config(cfg, tmp_path / "run", "ray")
    atomic_write_text(path, text)
    text = path.read_text()
    assert pw not in text and "${oc.env:XLP_TEST_SOURCE}" in text
    assert yaml.safe_load(text)["train"]["launcher"] == "ray"

    literal = load_config(TINY, [f"data.sources=[stdlib:json,'https://u:{pw}@host/x.jsonl']"])
    for submit in (submit_ray, submit_slurm):
        kw = {"address": None} if submit is submit_ray else {}
        with pytest.raises(SubmitError, match=r"data\.sources\[1\].*oc\.env") as e:
            submit(literal, run_dir=tmp_path / "run2", only=None, force=False, wait=False, out=io.StringIO(), **kw)
        assert pw not in str(e.value)
        assert not (tmp_path / "run2").exists() or not any((tmp_path / "run2").rglob("*.yaml"))
    assert secret_keys(env_references({"x": f"https://u:{pw}@h"}, env={})) == ["x"]


# ---------------------------------------------------------------------------------------------
# bad inputs: one line naming the file


def test_config_not_utf8_names_the_file_and_offset(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"run:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(bad)
    msg = str(e.value)
    assert str(bad) in msg and "UTF-8" in msg and "offset 16" in msg and "\n" not in msg


def test_cli_config_not_utf8_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe run: x\n")
    proc = subprocess.run(XLP + ["run", str(bad)], env=xlp_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xlp run: error:") and str(bad) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("content", [b"", b"garbage\x00\x01 this is not a model"], ids=["empty", "garbage"])
def test_bad_tokenizer_model_names_the_file(tmp_path, content):
    from xlp import tokenizer as tk
    from xlp.tokenizer.spm import TokenizerError

    model = tmp_path / "tokenizer.model"
    model.write_bytes(content)
    with pytest.raises(TokenizerError) as e:
        tk.load(model)
    msg = str(e.value)
    assert str(model) in msg and "SentencePiece model" in msg and "\n" not in msg
    assert ("0 bytes" in msg) == (content == b"")


def _tiny_model(path: Path) -> Path:
    from xlp import tokenizer as tk

    docs = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(300)]
    tk.train(docs, vocab_size=300, model_type="bpe").save(path)
    return path


@pytest.mark.slow
def test_empty_corpus_with_tokenizer_path_fails_in_shard(tmp_path):
    empty = tmp_path / "corpus.txt"
    empty.write_bytes(b"")
    model = _tiny_model(tmp_path / "given.model")
    run_dir = tmp_path / "run"
    proc = subprocess.run(XLP + ["run", str(TINY), f"data.sources=[{empty}]", f"tokenizer.path={model}",
                                 "--run-dir", str(run_dir)],
                          env=xlp_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert err[0].startswith("xlp run: error: stage 'shard' failed:") and "no tokens" in err[0], proc.stderr
    assert str(empty) in err[0]
    assert "Traceback" not in proc.stderr
    assert yaml.safe_load((run_dir / "shard" / "stage.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_garbage_tokenizer_path_fails_in_one_line(tmp_path):
    model = tmp_path / "garbage.model"
    model.write_bytes(b"\x00not a sentencepiece model at all")
    run_dir = tmp_path / "run"
    proc = subprocess.run(XLP + ["run", str(TINY), f"tokenizer.path={model}", "--stages", "tokenizer",
                                 "--run-dir", str(run_dir)],
                          env=xlp_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert err[0].startswith("xlp run: error: stage 'tokenizer' failed: TokenizerError: tokenizer model "
                             f"{model}: not a SentencePiece model"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert yaml.safe_load((run_dir / "tokenizer" / "stage.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------------------------------------
# end to end: no secret anywhere


def _planted() -> tuple[dict, list[str]]:
    wandb_key = pysecrets.token_hex(20)
    hf_token = "hf_" + pysecrets.token_hex(16)
    password = "pw" + pysecrets.token_hex(10)
    env = {"WANDB_API_KEY": wandb_key, "HF_TOKEN": hf_token,
           "XLP_TEST_SOURCE": f"ftp://reader:{password}@127.0.0.1:{free_port()}/corpus.jsonl"}
    return env, [wandb_key, hf_token, password]


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "secret.yaml"
    cfg.write_text(f"defaults:\n  - {TINY}\n"
                   # one small package: 5 training samples, too few for the default 8 loader streams
                   "data:\n  sources: ['stdlib:json', '${oc.env:XLP_TEST_SOURCE}']\n  on_error: skip\n  streams: 2\n"
                   "wandb:\n  mode: offline\n"
                   "train:\n  steps: 4\n  save_every: 4\n  eval_every: 4\n  log_every: 2\n")
    return cfg


def _find(roots: list[Path], needles: list[str]) -> list[str]:
    found = []
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file() and not f.is_symlink():
                try:
                    data = f.read_bytes()
                except OSError:
                    continue
                found += [f"{f}: secret #{i}" for i, n in enumerate(needles) if n.encode() in data]
    return found


STAGES = "tokenizer,shard,train"


@pytest.mark.slow
def test_no_secret_in_run_dir_or_ray_logs_local_launcher(tmp_path):
    env, needles = _planted()
    ray_tmp = Path(tempfile.mkdtemp(prefix="xs", dir="/tmp"))  # short: Ray's socket paths
    run_dir = tmp_path / "run"
    try:
        proc = subprocess.run(XLP + ["run", str(_config(tmp_path)), "--stages", STAGES, "--run-dir", str(run_dir)],
                              env=xlp_env({**env, "RAY_TMPDIR": str(ray_tmp)}, embedded_ray=True),
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
        assert "launch: local processes" in proc.stdout
        assert not [n for n in needles if n in proc.stdout + proc.stderr]
        assert "ftp://***@127.0.0.1" in (run_dir / "config.yaml").read_text()
        assert any((run_dir / "train").rglob("wandb/offline-run-*")), "W&B wrote no offline run"
        assert any(ray_tmp.rglob("session_*/logs/*")), "no Ray session logs to search"
        assert _find([run_dir, ray_tmp], needles) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def secret_ray_head():
    """A real Ray head (infra/local-ray.sh) whose environment holds the planted secrets, as a
    cluster's does: the job and its workers inherit them from the raylet."""
    env_secrets, needles = _planted()
    temp = Path(tempfile.mkdtemp(prefix="xr", dir="/tmp"))
    port, dash = free_port(), free_port()
    env = dict(os.environ, **env_secrets, RAY_PORT=str(port), RAY_DASHBOARD_PORT=str(dash), RAY_NUM_CPUS="2",
               RAY_TEMP_DIR=str(temp))
    script = str(REPO / "infra" / "local-ray.sh")
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield f"http://127.0.0.1:{dash}", env_secrets, needles, temp
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_no_secret_in_run_dir_or_ray_logs_ray_train_job(secret_ray_head, tmp_path):
    address, env, needles, ray_temp = secret_ray_head
    run_dir = tmp_path / "run"
    proc = subprocess.run(XLP + ["submit", str(_config(tmp_path)), "--to", "ray", "--address", address, "--wait",
                                 "--stages", STAGES, "--run-dir", str(run_dir)],
                          env=xlp_env(env), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "launch: ray train, 2 workers" in proc.stdout
    assert not [n for n in needles if n in proc.stdout + proc.stderr]
    submitted = next((run_dir / "submit").glob("*.yaml")).read_text()
    assert "${oc.env:XLP_TEST_SOURCE}" in submitted
    assert "ftp://***@127.0.0.1" in (run_dir / "config.yaml").read_text()
    assert any(ray_temp.rglob("session_*/logs/*")), "no Ray session logs to search"
    assert _find([run_dir, ray_temp], needles) == []
