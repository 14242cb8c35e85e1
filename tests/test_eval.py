"""The eval stage on a tiny run made here: a real SentencePiece tokenizer and shards from standard
library sources, a tiny xLSTM[1:1] trained for a few dozen steps with plain AdamW (the train stage's
own tests cover DeepSpeed), and its untrained twin (same config, same seed)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SEQ = 64
SEED = 0
TOK_VOCAB = 512
TINY_MODEL = ["model.arch=xlstm", "model.d_model=32", "model.num_blocks=2", "model.num_heads=2",
              "model.slstm_at=[1]", "model.slstm_num_heads=2", "model.tie_weights=true", "model.mlstm_chunk_size=16"]
EVAL_SMALL = [
    "eval.batch_size=4", "eval.ppl_batches=6", "eval.context_multipliers=[1,2,4,8]", "eval.long_context_tokens=1024",
    "eval.gen_contexts=[32,128,512]", "eval.gen_tokens=4", "eval.prefill_chunk=128", "eval.recall_pairs=[4,16]",
    "eval.recall_queries=4", "eval.recall_trials=8", "eval.recall_batch_size=8", "eval.lm_eval_limit=6",
    "eval.lm_eval_batch_size=4", "eval.cloze_items=12", "eval.cloze_context_chars=300", "eval.threads=1",
]


def stdlib_docs(n: int, max_chars: int = 6000) -> list[str]:
    """The first n readable .py files of the running Python's standard library, sorted by path."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(lib.glob("*.py")):
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) > 1500:
            out.append(text[:max_chars])
        if len(out) >= n:
            break
    return out


def make_run(run_dir: Path, *, train_steps: int = 60, extra: list[str] = ()) -> Path:
    """A run directory with config.yaml, tokenizer/, shard/ and train/model + train/metrics.jsonl."""
    from xlp import tokenizer as tk
    from xlp.pipeline.core.config import load_config, section, to_yaml
    from xlp.pipeline.data.loader import ShardLoader
    from xlp.pipeline.data.shards import MANIFEST, ShardWriter, build_manifest, token_dtype
    from xlp.xlstm_model import build_model, save_model

    run_dir = Path(run_dir)
    cfg = load_config(None, [f"run.dir={run_dir}", f"run.seed={SEED}", f"data.seq_len={SEQ}", "wandb.mode=disabled",
                             *TINY_MODEL, *EVAL_SMALL, *extra])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    docs = stdlib_docs(90)
    tok = tk.train(docs[:60], vocab_size=TOK_VOCAB, num_threads=2)
    tok.save(run_dir / "tokenizer" / "tokenizer.model")
    shard = run_dir / "shard"
    shard.mkdir(parents=True)
    dtype = token_dtype(tok.vocab_size)
    for split, part in (("train", docs[:70]), ("val", docs[70:])):
        w = ShardWriter(shard, split, 0, dtype=dtype, sample_tokens=2048, shard_bytes=1 << 20)
        for d in part:
            w.add_doc(np.asarray(tok.encode(d) + [tok.eos_id], dtype=np.int64), "stdlib")
        w.close()
    manifest = build_manifest(shard, dtype=dtype, tokenizer_info={"vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
                              config={}, read_counts={}, per_source={})
    (shard / MANIFEST).write_text(json.dumps(manifest))

    mcfg = section(cfg, "model")
    mcfg.vocab_size = math.ceil(tok.vocab_size / 64) * 64
    torch.manual_seed(SEED)  # what the train stage does before build_model
    model = build_model(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = ShardLoader(shard, split="train", seq_len=SEQ, batch_size=8, seed=SEED)
    lines = []
    for step, batch in zip(range(1, train_steps + 1), loader):
        loss = model(batch["input_ids"], doc_starts=batch["doc_starts"], targets=batch["targets"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec = {"step": step, "train/loss": float(loss.detach())}
        if step % 20 == 0:
            rec["val/loss"] = float(loss.detach())
        lines.append(json.dumps(rec))
    (run_dir / "train").mkdir(exist_ok=True)
    (run_dir / "train" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    save_model(model.eval(), mcfg, run_dir / "train" / "model")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # tiny ops: more threads only contend on a busy 2-core machine
    return make_run(tmp_path_factory.mktemp("evalrun") / "run")


def stage_ctx(run_dir: Path, overrides: list[str] = ()):
    from xlp.pipeline.core.config import load_config
    from xlp.pipeline.core.stage import StageContext

    cfg = load_config(Path(run_dir) / "config.yaml", list(overrides))
    (Path(run_dir) / "eval").mkdir(exist_ok=True)
    return StageContext(name="eval", cfg=cfg, run_dir=Path(run_dir), fingerprint="test")


@pytest.fixture(scope="module")
def evaluated(run_dir) -> dict:
    """The eval stage run once on the tiny run; its metrics."""
    from xlp.pipeline.stages.eval import run

    return run(stage_ctx(run_dir))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_stage_numbers_in_expected_ranges(run_dir, evaluated):
    m = evaluated
    res = json.loads((run_dir / "eval" / "results.json").read_text())
    for key in ("val_loss", "val_ppl", "val_bpb", "untrained_bpb", "bytes_per_token", "loss_beyond_train_len",
                "recall_acc", "gen_decode_tok_s_max_ctx"):
        assert _finite(m[key]), (key, m.get(key))
    ppl = res["ppl"]
    # an untrained model predicts nearly uniformly: loss ~ ln(vocab), bpb ~ log2(vocab) / bytes per token
    assert abs(ppl["untrained"]["loss"] - ppl["uniform_loss"]) < 0.4
    assert ppl["uniform_loss"] == pytest.approx(math.log(512))
    assert abs(m["untrained_bpb"] / ppl["uniform_bpb"] - 1) < 0.08, (m["untrained_bpb"], ppl["uniform_bpb"])
    # the trained model is well below its untrained twin
    assert m["val_bpb"] < m["untrained_bpb"] - 0.4
    assert 1.0 < m["bytes_per_token"] < 6.0
    # long context: every multiplier evaluated, buckets up to 8x the training length
    lc = res["long_context"]["results"]
    assert [r["multiplier"] for r in lc] == [1, 2, 4, 8]
    assert all(_finite(r["loss"]) and r["rows"] >= 1 for r in lc)
    assert lc[-1]["buckets"][-1]["hi"] == 8 * SEQ and lc[-1]["tokens_beyond_train_len"] > 0
    assert all(_finite(b["loss"]) and 2.0 < b["loss"] < 8.0 for r in lc for b in r["buckets"])
    # generation: an xLSTM's state does not grow with the prompt
    gen = res["generation"]["results"]
    assert [g["context"] for g in gen] == [32, 128, 512]
    assert len({g["state_bytes"] for g in gen}) == 1 and gen[0]["state_bytes"] > 0
    assert all(g["decode_tokens_per_s"] > 0 and g["decode_peak_bytes"] > 0 for g in gen)
    # recall: accuracies are probabilities, chance recorded
    for r in res["recall"]["results"]:
        assert 0.0 <= r["acc"] <= 1.0 and r["chance"] == 1.0 / r["pairs"] and 0.0 <= r["untrained_acc"] <= 1.0
    # lm-eval: the four bundled tasks ran
    lm = res["lm_eval"]["results"]
    assert set(lm) == {"xlp_cloze", "xlp_cloze_mc", "xlp_cloze_gen", "xlp_heldout"}
    assert 0.0 <= lm["xlp_cloze_mc"]["acc"] <= 1.0 and 0.0 <= lm["xlp_cloze_gen"]["exact_match"] <= 1.0
    # lm-eval's own bits per byte of held-out openings agrees roughly with the stage's
    assert 0.6 < lm["xlp_heldout"]["bits_per_byte"] / m["val_bpb"] < 1.6
    assert (run_dir / "eval" / "lm_eval" / "results.json").is_file()
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["val_bpb"] == m["val_bpb"]


def test_report_and_plots(run_dir, evaluated):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = (run_dir / "eval" / "report.md").read_text()
    for section in ("Held-out perplexity", "Long context", "Generation cost", "Associative recall",
                    "lm-evaluation-harness", "below the untrained one"):
        assert section in report, section
    assert evaluated["plots"] == ["train_loss.png", "loss_vs_context.png", "memory_vs_context.png", "recall.png"]
    for name in evaluated["plots"]:
        path = run_dir / "eval" / name
        assert f"]({name})" in report
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = plt.imread(path)
        assert img.shape[0] > 300 and img.shape[1] > 600 and float(img[..., :3].std()) > 0.05, name


def test_untrained_recall_near_chance(run_dir):
    from xlp.pipeline.core.config import load_config, section
    from xlp.pipeline.eval.common import build_untrained
    from xlp.pipeline.eval.recall import recall_probe

    cfg = load_config(run_dir / "config.yaml")
    mcfg = section(cfg, "model")
    mcfg.vocab_size = 512
    model = build_untrained(mcfg, SEED, torch.device("cpu"))
    res = recall_probe(model, pairs=[8, 32], queries=8, trials=48, batch_size=16, vocab_size=TOK_VOCAB, eos_id=3,
                       device=torch.device("cpu"), seed=1, first_id=4, log=lambda m: None)
    for r in res["results"]:
        assert abs(r["acc"] - r["chance"]) < 0.07, r
        assert r["acc_vocab"] < 0.05
        assert sum(b["queries"] for b in r["by_distance"]) == 48 * 8


def _direct_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context) with one plain forward pass of one row (no batching, no padding). The
    continuation's tokens: those of the encoded context + continuation from the first one holding a byte
    of the continuation."""
    whole = tok.encode(context + continuation)
    cut = int(np.searchsorted(np.cumsum(tok.token_bytes()[whole]), len(context.encode()), side="right"))
    ctx, cont = whole[:cut], whole[cut:]
    full = [tok.eos_id] + ctx + cont
    x = torch.tensor([full[:-1]])
    d = torch.zeros_like(x, dtype=torch.bool)
    d[0, :2] = True
    with torch.no_grad():
        logp = torch.log_softmax(model(x, doc_starts=d)[0].double(), dim=-1)
    n = len(cont)
    rows = logp[len(full) - 1 - n:]
    tgt = torch.tensor(cont)
    return float(rows.gather(-1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all())


def _cloze_tasks(run_dir: Path, tok, tmp: Path) -> Path:
    from xlp.pipeline.eval.cloze import build_items, write_items, write_task_dir

    items = build_items(run_dir / "shard", tok, n_items=8, context_chars=200, seed=0)
    data = write_items(items, tmp / "cloze.jsonl")
    write_task_dir(tmp / "tasks", data)
    return tmp / "tasks"


def test_lm_eval_loglikelihoods_match_direct_computation(run_dir, tmp_path):
    from xlp.pipeline.eval.common import load_tokenizer, load_trained
    from xlp.pipeline.eval.harness import XLPLM, run_tasks

    tok = load_tokenizer(run_dir)
    model = load_trained(run_dir, torch.device("cpu"))
    task_dir = _cloze_tasks(run_dir, tok, tmp_path)
    lm = XLPLM(model=model, tokenizer=tok, device="cpu", batch_size=3, max_length=4096)
    res = run_tasks(lm, ["xlp_cloze", "xlp_cloze_mc", "xlp_heldout", "xlp_cloze_gen"], include_path=task_dir,
                    limit=4, log_samples=True)
    samples = res["samples"]
    n = 0
    for task in ("xlp_cloze", "xlp_cloze_mc"):
        for s in samples[task]:
            for args, resp in zip(s["arguments"], s["resps"]):
                context, continuation = args[0], args[1]
                ll, greedy = _direct_loglikelihood(model, tok, context, continuation)
                assert resp[0][0] == pytest.approx(ll, abs=2e-3, rel=1e-4), (task, continuation)
                assert bool(resp[0][1]) == greedy
                n += 1
    for s in samples["xlp_heldout"]:  # one window (max_length 4096): the whole text in one pass
        text = s["arguments"][0][0]
        ids = tok.encode(text)
        ll, _ = _direct_loglikelihood(model, tok, "", text)
        assert len(ids) < 4096 and s["resps"][0][0] == pytest.approx(ll, abs=2e-3, rel=1e-4)
        n += 1
    for s in samples["xlp_cloze_gen"]:  # greedy generation = the model's own greedy decode
        context = s["arguments"][0][0]
        out = model.generate(torch.tensor([tok.encode(context)]), max_new_tokens=48, temperature=0)
        text = tok.decode(out[0, len(tok.encode(context)):].tolist()).split("\n")[0]
        assert s["resps"][0][0].split("\n")[0] == text[:len(s["resps"][0][0])]
        n += 1
    assert n >= 4 + 16 + 4 + 4


def test_rolling_windows_predict_every_token_once():
    from xlp.pipeline.eval.harness import XLPLM

    lm = XLPLM.__new__(XLPLM)
    lm.eos, lm.max_length = 3, 5
    for n in (1, 4, 5, 6, 11, 23):
        toks = list(range(10, 10 + n))
        windows = lm.rolling_windows(toks)
        scored = [t for full, k, _ in windows for t in full[1:][len(full) - 1 - k:]]
        assert scored == toks, n
        assert all(len(full) - 1 <= 5 for full, _, _ in windows)
        assert windows[0][2] and not any(r for _, _, r in windows[1:])
        assert all(len(full) - 1 == 5 for full, _, _ in windows[1:])  # later windows get full context


def test_lm_eval_cli_runs_our_model(run_dir, tmp_path):
    from xlp.pipeline.eval.common import load_tokenizer, load_trained

    tok = load_tokenizer(run_dir)
    task_dir = _cloze_tasks(run_dir, tok, tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "xlp.pipeline.eval.harness", "run", "--model", "xlp", "--model_args",
           f"run_dir={run_dir},max_length=4096", "--tasks", "xlp_cloze", "--include_path", str(task_dir),
           "--limit", "3", "--batch_size", "2", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.rglob("samples_xlp_cloze_*.jsonl"))
    assert files, list(out.rglob("*"))
    model = load_trained(run_dir, torch.device("cpu"))
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        context, continuation = r["arguments"]["gen_args_0"]["arg_0"], r["arguments"]["gen_args_0"]["arg_1"]
        ll, _ = _direct_loglikelihood(model, tok, context, continuation)
        assert float(r["resps"][0][0][0]) == pytest.approx(ll, abs=2e-3, rel=1e-4)


def test_token_byte_lengths_match_decoded_text(run_dir):
    from xlp.pipeline.eval.common import load_tokenizer, token_byte_lengths

    tok = load_tokenizer(run_dir)
    blen = token_byte_lengths(tok, 576)
    assert len(blen) == 576 and blen[tok.eos_id] == 0 and blen[tok.vocab_size:].sum() == 0
    for text in ("def f(x):\n    return x + 1\n", "héllo wörld ✓ 日本語 — ünïcode\n\ttabs  and  spaces ",
                 Path(sysconfig.get_paths()["stdlib"], "os.py").read_text()[:3000]):
        ids = tok.encode(text)
        assert int(blen[ids].sum()) == len(tok.decode(ids).encode("utf-8")) == len(text.encode("utf-8"))


def test_generation_cost_kv_cache_grows_xlstm_state_does_not():
    from xlp.pipeline.eval.gencost import generation_cost
    from xlp.xlstm_model import ModelConfig, build_model

    sizes = {}
    for arch in ("xlstm", "llama"):
        cfg = ModelConfig(arch=arch, vocab_size=128, d_model=32, num_blocks=2, num_heads=2, mlstm_chunk_size=16)
        torch.manual_seed(0)
        res = generation_cost(build_model(cfg).eval(), contexts=[16, 64, 256], gen_tokens=3, prefill_chunk=64,
                              vocab_size=128, device=torch.device("cpu"), log=lambda m: None)
        sizes[arch] = [r["state_bytes"] for r in res["results"]]
        assert all(r["decode_tokens_per_s"] > 0 for r in res["results"])
    assert len(set(sizes["xlstm"])) == 1
    # the KV cache holds every token: (prompt + 2 untimed steps) x 2 (k, v) x blocks x d_model x 4 bytes
    assert sizes["llama"] == [(c + 2) * 2 * 2 * 32 * 4 for c in (16, 64, 256)]


def test_eval_config_errors_name_the_key():
    from xlp.pipeline.core.config import ConfigError, load_config

    for override, key in (("eval.parts=[ppl,bogus]", "eval.parts"), ("eval.device=tpu", "eval.device"),
                          ("eval.batch_size=0", "eval.batch_size"), ("eval.gen_contexts=[1]", "eval.gen_contexts"),
                          ("eval.position_buckets=[5,3]", "eval.position_buckets"),
                          ("eval.tasks=[hellaswag]", "eval.tasks"), ("eval.ppl_batches=-1", "eval.ppl_batches")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="Valid keys there: .*baseline"):
        load_config(None, ["eval.nope=1"])
    cfg = load_config(None, ["eval.tasks=[hellaswag]", "eval.lm_eval_offline=false"])
    assert list(cfg.eval.tasks) == ["hellaswag"]


def test_eval_stage_registered_with_its_reads():
    from xlp.pipeline.core.registry import STAGES
    from xlp.pipeline.stages.eval import STAGE

    st = {s.name: s for s in STAGES}["eval"]
    assert st is STAGE and st.needs == ("tokenizer", "shard", "train")
    assert {"eval", "data.seq_len", "run.seed", "kernels"} <= set(st.reads)
    assert "decode" not in st.reads  # the eval stage never runs the decoder: its settings change nothing there
    assert [s.name for s in STAGES].index("eval") > [s.name for s in STAGES].index("train")


def test_compare_prints_runs_side_by_side(run_dir, evaluated, tmp_path, capsys):
    import shutil

    from xlp.pipeline.cli import main

    other = tmp_path / "other"
    shutil.copytree(run_dir / "eval", other / "eval", ignore=shutil.ignore_patterns("lm_eval", "*.png"))
    metrics = json.loads((other / "eval" / "metrics.json").read_text())
    metrics["val_bpb"] = 1.2345
    (other / "eval" / "metrics.json").write_text(json.dumps(metrics))
    assert main(["compare", str(run_dir), str(other)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("val_bpb "))
    assert f"{evaluated['val_bpb']:.4g}" in line and "1.234" in line
    # the eval stage was called directly here (no stage.json): both columns starred, with a note
    assert out.splitlines()[0].split()[1:] == [run_dir.name + "*", "other*"]
    assert "* other: its eval stage has no stage.json" in out
    assert "xlp_cloze_mc/acc" in out and "arch" in out
    assert main(["compare", str(tmp_path / "missing")]) == 1


def test_compare_marks_an_eval_that_failed_or_is_stale(run_dir, evaluated, tmp_path, capsys):
    """Issue 29, item 8: `xlp compare` printed a failed or stale eval's numbers as if done. Each run's eval
    status is a row of its own; a column whose eval is not done with the run's config is starred, and a
    note under the table says what its numbers are and how to evaluate it again."""
    import shutil

    from xlp.pipeline.cli import main
    from xlp.pipeline.core.config import load_run_config
    from xlp.pipeline.core.registry import STAGES
    from xlp.pipeline.core.stage import StageMarker, fingerprints

    fp = fingerprints(STAGES, load_run_config(run_dir / "config.yaml"))["eval"]
    for name in ("done", "failed", "stale"):
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        shutil.copy(run_dir / "config.yaml", run)
        for f in ("metrics.json", "results.json"):
            shutil.copy(run_dir / "eval" / f, run / "eval")
        marker = StageMarker(run / "eval" / "stage.json", "eval", fingerprint="0123456789abcdef" if name == "stale" else fp,
                             trajectory="t", resumed=False)
        if name == "failed":
            marker.failed("ValueError: eval.tasks: no task named 'hellaswag2'")
        else:
            marker.done(evaluated)
    assert main(["compare", *(str(tmp_path / n) for n in ("done", "failed", "stale"))]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[1:] == ["done", "failed*", "stale*"]
    assert lines[2].split() == ["eval", "stage", "done", "FAILED", "STALE"]
    assert ("* failed: its eval failed (ValueError: eval.tasks: no task named 'hellaswag2'): the numbers are what "
            f"it left, not a finished evaluation; `xlp run CONFIG --run-dir {tmp_path / 'failed'} --stages eval` "
            "evaluates it again") in lines
    assert ("* stale: its eval is stale: it finished with another config than config.yaml says now (fingerprint "
            f"0123456789abcdef, now {fp})") in out
    assert not any(line.startswith("* done") for line in lines)


def test_report_plots_logged_to_offline_wandb(run_dir, evaluated, tmp_path):
    from xlp.pipeline.eval import report

    ctx = stage_ctx(run_dir, ["wandb.mode=offline", "wandb.project=xlp-test"])
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    headline = json.loads((run_dir / "eval" / "metrics.json").read_text())
    plots = [run_dir / "eval" / p for p in evaluated["plots"]]
    run_id = report.log_wandb(tmp_path, ctx.cfg, headline, results, plots)
    assert run_id
    (offline,) = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    images = sorted(p.name for p in (offline / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == 4 and any(n.startswith("loss_vs_context") for n in images)
    assert list((offline / "files" / "media" / "table").rglob("long_context*.table.json"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_eval_on_a_full_disk_names_the_file_and_leaves_no_result(run_dir, tmp_path):
    """Issue 29 item 9: a real tmpfs under RUN_DIR/eval, filled but for 16 KiB (results.json fits, the
    first plot does not): the stage fails with the message the shard and train stages give, and eval/
    holds no results.json, metrics.json or report.md; with space again, a rerun writes them all."""
    import shutil

    from conftest import fill_disk

    from xlp.pipeline.core.diskfull import DiskFull
    from xlp.pipeline.stages.eval import run

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("eval"))
    eval_dir = copy / "eval"
    eval_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(eval_dir)], check=True)
    try:
        filler = eval_dir / "filler"
        fill_disk(filler)  # to the last byte, then give back 16 KiB
        os.truncate(filler, filler.stat().st_size - 16 * 1024)
        parts = ["eval.parts=[ppl]", "eval.baseline=false", "eval.ppl_batches=2", "eval.plots=true"]
        with pytest.raises(DiskFull) as e:
            run(stage_ctx(copy, parts))
        assert re.fullmatch(rf"No space left on device writing {re.escape(str(eval_dir))}/\S+: free space or move "
                            r"run\.dir", str(e.value)), str(e.value)
        left = sorted(p.name for p in eval_dir.iterdir())
        assert not {"results.json", "metrics.json", "report.md"} & set(left), left
        assert not list(eval_dir.glob("*.png")), left
        assert (eval_dir / ".partial" / "results.json").is_file()  # what it wrote, out of the way
        filler.unlink()
        metrics = run(stage_ctx(copy, parts))
        assert json.loads((eval_dir / "metrics.json").read_text())["val_bpb"] == metrics["val_bpb"]
        assert (eval_dir / "results.json").is_file() and (eval_dir / "report.md").is_file()
        assert not (eval_dir / ".partial").exists()
    finally:
        subprocess.run(["umount", "-l", str(eval_dir)], check=False)


def test_lm_eval_command_finds_any_run_dirs_tasks_after_a_move(tmp_path, monkeypatch, capsys):
    """The lm-eval command for a run directory (`--model_args run_dir=RUN_DIR`, no --include_path) finds the
    tasks the eval stage wrote there, and they read that run's items even after the run directory was moved
    (their absolute path is the old one); run from another working directory than the repository. lm-eval's
    `dummy` model stands in for a trained one: what is checked is which task files and items are read."""
    from xlp.pipeline.eval.cloze import write_items, write_task_dir

    old, new = tmp_path / "old run", tmp_path / "moved" / "run"
    lm_dir = old / "eval" / "lm_eval"
    items = [{"id": i, "doc": i, "context": f"line {i}\n", "target": f"x = value_{i}", "word_context": f"line {i}\nx =",
              "word": f" value_{i}", "choices": [f"x = value_{i}", "pass"], "label": 0, "text": f"line {i}\nx = value_{i}"}
             for i in range(3)]
    write_task_dir(lm_dir / "tasks", write_items(items, lm_dir / "cloze.jsonl"))
    new.parent.mkdir()
    old.rename(new)
    # the harness's own command line (main) in this process, from another working directory, with lm-eval's
    # dummy model registered (the wrapper registers only `xlp`)
    import lm_eval.models.dummy  # noqa: F401
    from xlp.pipeline.eval.harness import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    main(["run", "--model", "dummy", "--model_args", f"run_dir={new}", "--tasks", "xlp_cloze",
          "--output_path", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert re.search(r"\|xlp_cloze\s*\|", out), out[-2000:]
    # the run's files as written (parsed: the YAML writer folds a long path over two lines)
    written = yaml.safe_load((new / "eval" / "lm_eval" / "tasks" / "xlp_cloze.yaml").read_text())
    assert written["dataset_kwargs"]["data_files"] == {"test": str((old / "eval" / "lm_eval" / "cloze.jsonl").resolve())}
