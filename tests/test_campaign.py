"""benchmarks/gpu_campaign.sh: its CPU dry run (tiny models, the same commands and files) runs every
part with nothing but torch and triton importable and the project not installed (benchmarks/_xlp_path.sh
makes xlp.* importable from the copy), and its table judges the figures against the goals."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the lent GPU machine does not have, and what the benchmarks must not need: importing any of
# these fails in the dry run's processes (xlp.pipeline and xlp.tokenizer are in the copy, but the GPU parts
# must not need them).
NOT_ON_THE_GPU_MACHINE = ("deepspeed", "ray", "omegaconf", "webdataset", "safetensors", "wandb", "pipeline",
                          "tokenizer", "xlp.pipeline", "xlp.tokenizer", "sentencepiece", "yaml")
# Nor is the project installed there: the dry run's processes drop an editable install's import hooks, so
# xlp.* comes from the campaign's import shim (links to this checkout's folders), as on the GPU machine.
NOT_INSTALLED = """
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
"""


@pytest.mark.slow  # every campaign part at tiny size, the pipeline part with DeepSpeed included
def test_campaign_dry_run(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\nfor name in %r:\n    sys.modules[name] = None\n" % (NOT_ON_THE_GPU_MACHINE,) + NOT_INSTALLED)
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(block), COMMIT="test")
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_campaign.sh"), str(out), "--dry-run"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    log = (out / "campaign.log").read_text()
    parts = [line.split("\t")[1:3] for line in log.splitlines() if line.startswith("part\t")]
    assert parts == [["kernels", "0"], ["train_2k", "0"], ["train_8k", "0"], ["decode", "0"]]
    assert "commit: test" in log
    assert f"xlp: {REPO} through an import shim on PYTHONPATH" in log
    # no more than a lent machine gives back from its $OUT (8 files)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["campaign.log", "kernels.log", "train_2k.log", "train_8k.log", "decode.log", "train.jsonl", "decode.jsonl",
         "table.md"])
    for name in ("kernels", "train_2k", "train_8k", "decode"):
        assert (out / f"{name}.log").stat().st_size > 0

    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert sorted((r["model"], r["mode"], r["batch"], r["seq_len"]) for r in train) == sorted(
        (m, mode, b, s) for m in ("tiny_xlstm_large", "tiny_llama") for mode in ("eager", "compiled")
        for b, s in ((2, 64), (1, 128)))
    by = {(r["model"], r["mode"], r["seq_len"]): r for r in train}
    for r in train:
        assert "error" not in r and r["tokens_per_s"] > 0 and r["loss_finite"], r
        assert r["backend"] == ("aot_eager" if r["mode"] == "compiled" else None)
        # the compiled step computes the eager step's loss (bf16 autocast: to bf16 rounding)
        assert r["first_loss"] == pytest.approx(by[r["model"], "eager", r["seq_len"]]["first_loss"], rel=1e-2)
    decode = [json.loads(line) for line in (out / "decode.jsonl").read_text().splitlines()]
    assert sorted((r["variant"], r["ctx"]) for r in decode) == sorted(
        (v, c) for v in ("base", "pdl", "compiled") for c in (16, 32))
    assert all(r["same_argmax"] and r["tokens_per_s"] > 0 for r in decode)
    assert [r["fused"] for r in decode if r["ctx"] == 16] == [True, True, False]

    table = (out / "table.md").read_text()
    assert table in run.stdout  # the table is the run's last output
    assert re.search(r"^\| Triton kernels vs the float64 reference \| \d+ ok, 0 FAIL \| all ok \| met \|$", table, re.M)
    assert re.search(r"^\| B1xS128 \| tiny_xlstm_large \| compiled \| [\d,]+ \| ", table, re.M)
    assert re.search(r"^\| fused \| [\d,]+ \| [\d,]+ \| [\d.]+x / [\d.]+x \|$", table, re.M)


def test_campaign_table_judges_goals(tmp_path):
    """A GPU-sized result set: a met and a missed goal, a compile that timed out, a failed kernel."""
    def train_row(model, arch, mode, b, s, tps, peak):
        return {"model": model, "arch": arch, "mode": mode, "batch": b, "seq_len": s, "tokens_per_s": tps,
                "ms_per_step": b * s / tps * 1e3, "mfu": 0.4, "peak_gib": peak, "setup_s": 5.0}

    rows = [train_row("xlstm_large_400m", "xlstm_large", "eager", 8, 2048, 90_000.0, 30.0),
            train_row("xlstm_large_400m", "xlstm_large", "compiled", 8, 2048, 120_000.0, 31.0),
            train_row("llama_400m", "llama", "eager", 8, 2048, 100_000.0, 33.0),
            train_row("llama_400m", "llama", "compiled", 8, 2048, 110_000.0, 33.0),
            train_row("xlstm_large_400m", "xlstm_large", "eager", 2, 8192, 100_000.0, 36.0),
            train_row("llama_400m", "llama", "eager", 2, 8192, 80_000.0, 33.0),
            {"model": "xlstm_large_400m", "mode": "compiled", "batch": 2, "seq_len": 8192, "error": "OutOfMemoryError: x"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "kernels.log").write_text("  [ok] rms_norm float32\n  [FAIL] mlstm_chunkwise bfloat16\n")
    (tmp_path / "campaign.log").write_text("commit: abc1234\npart\tkernels\t1\t30\npart\ttrain_2k\t0\t150\n"
                                           "part\ttrain_8k\t124\t170\npart\tdecode\tskipped\t0\n")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "campaign_table.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    t = r.stdout
    assert "| Triton kernels vs the float64 reference | 1 ok, 1 FAIL | all ok | NOT met |" in t
    assert "| xlstm_large_400m train tok/s, B8xS2048 (compiled) | 120,000 | >= 100,000 | met |" in t
    assert "| xlstm_large_400m / llama_400m tok/s (best of each), B8xS2048 | 1.09x | >= 1.00x | met |" in t
    assert "| xlstm_large_400m train tok/s, B2xS8192 (eager) | 100,000 | >= 110,000 | NOT met |" in t
    assert "| xlstm_large_400m / llama_400m tok/s (best of each), B2xS8192 | 1.25x | >= 1.35x | NOT met |" in t
    assert "| xlstm_large_400m peak memory, B2xS8192 (eager) | 36.0 GiB | <= 34 GiB | NOT met |" in t
    assert "| batch-1 decode tok/s, best | - | >= 1,800 | unmeasured |" in t
    assert "| train_8k | 124 (timed out) | 170 |" in t and "| decode | skipped (no time left) | 0 |" in t
    assert "commit: abc1234" in t and "part\t" not in t
    assert "| B8xS2048 | xlstm_large_400m | compiled | 120,000 | 136.5 | 40.0% | 31.0 | 5 | 1.33x | 1.09x |" in t
    assert "| B2xS8192 | xlstm_large_400m | compiled | FAILED: OutOfMemoryError: x |" in t


def test_campaign_out_of_time_still_prints_the_table(tmp_path):
    """With no time left (CAMPAIGN_SECONDS below the 10 s kept for the table) every part is skipped,
    the table is still written, and the run exits non-zero."""
    env = dict(os.environ, PYTHON=sys.executable, CAMPAIGN_SECONDS="5", COMMIT="test")
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_campaign.sh"), str(tmp_path), "--dry-run"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-2000:]
    for name in ("kernels", "train_2k", "train_8k", "decode"):
        assert f"== {name}: skipped, no time left ==" in run.stdout
        assert f"| {name} | skipped (no time left) | 0 |" in (tmp_path / "table.md").read_text()
    assert "| batch-1 decode tok/s, best | - | >= 1,800 | unmeasured |" in run.stdout
