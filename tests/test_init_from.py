"""Issue 30: continued pretraining of a released xLSTM. `model.init_from=hf:DIR` takes the model section from
the checkpoint's config.json (a disagreeing command-line key is refused naming both values); under ZeRO-3
each rank builds the model partitioned and reads only its share of the checkpoint; the run's first loss is
transformers' own on the same batch; the export reloads in transformers and greedy-decodes as we do."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xlp.pipeline.core.config import ConfigError, load_config, load_run_config, seal_run_config, to_yaml
from xlp.xlstm_model import ModelConfig, build_model
from xlp.xlstm_model import hf

REPO = Path(__file__).resolve().parents[1]
XLP = [sys.executable, "-m", "xlp.pipeline.cli"]


def _hf_dir(tmp_path: Path, **kw) -> Path:
    """A transformers xLSTM checkpoint folder written by our exporter (random weights, untied head)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(arch="xlstm_large", vocab_size=384, d_model=128, num_blocks=2, num_heads=4,
                                tie_weights=False, norm_eps=1e-6), **kw})
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / "ckpt"
    hf.save_hf(model, cfg, out)
    return out


# ------------------------------------------------------------------------------- the model section
def test_the_model_section_comes_from_the_checkpoint(tmp_path):
    ckpt = _hf_dir(tmp_path)
    # the tiny config's own model (the NeurIPS xlstm stack, d 64) is replaced by the checkpoint's
    cfg = load_config("tiny", [f"model.init_from=hf:{ckpt}"])
    m = cfg.model
    assert (m.arch, m.vocab_size, m.d_model, m.num_blocks, m.num_heads, m.tie_weights) == \
        ("xlstm_large", 384, 128, 2, 4, False)
    assert list(m.slstm_at) == [] and m.gate_soft_cap == 15.0 and m.logit_soft_cap == 30.0
    # a run-side key the checkpoint does not decide stays the user's; one that agrees is accepted
    cfg = load_config("tiny", [f"model.init_from=hf:{ckpt}", "model.d_model=128", "model.activation_checkpointing=true"])
    assert cfg.model.d_model == 128 and cfg.model.activation_checkpointing is True


def test_a_command_line_model_key_that_disagrees_is_refused_naming_both(tmp_path):
    ckpt = _hf_dir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [f"model.init_from=hf:{ckpt}", "model.d_model=256", "model.tie_weights=true"])
    msg = str(e.value)
    assert "model.d_model=256 (the checkpoint's config.json: 128)" in msg
    assert "model.tie_weights=True (the checkpoint's config.json: False)" in msg
    assert str(ckpt / "config.json") in msg
    with pytest.raises(ConfigError, match=r"model.init_from=hf:.*nowhere: no config.json"):
        load_config("tiny", [f"model.init_from=hf:{tmp_path / 'nowhere'}"])


def test_a_run_config_does_not_need_the_checkpoint_again(tmp_path):
    """RUN_DIR/config.yaml holds the checkpoint's model section: status, generate and export read it after
    the checkpoint has moved."""
    ckpt = _hf_dir(tmp_path)
    cfg = load_config("tiny", [f"model.init_from=hf:{ckpt}"])
    (tmp_path / "config.yaml").write_text(seal_run_config(to_yaml(cfg)))
    shutil.rmtree(ckpt)
    again = load_run_config(tmp_path / "config.yaml")
    assert again.model.d_model == 128 and again.model.arch == "xlstm_large"


def test_the_reader_reads_any_flat_range_of_our_tensors(tmp_path):
    """CheckpointReader.read_flat (what a ZeRO-3 rank reads) equals the whole converted tensor's slice,
    across the boundaries of the transformers tensors it concatenates."""
    ckpt = _hf_dir(tmp_path)
    _, state = hf.read_hf_checkpoint(ckpt)
    cfg = hf.from_hf_config(json.loads((ckpt / "config.json").read_text()))
    whole = hf.from_hf_state_dict(state, cfg)
    reader = hf.CheckpointReader(f"hf:{ckpt}")
    assert set(reader.names()) == set(whole)
    g = torch.Generator().manual_seed(0)
    for name, t in whole.items():
        flat = t.reshape(-1)
        assert reader.shape(name) == tuple(t.shape)
        for _ in range(4):
            a, b = sorted(torch.randint(0, flat.numel() + 1, (2,), generator=g).tolist())
            assert torch.equal(reader.read_flat(name, a, b), flat[a:b]), (name, a, b)
        assert torch.equal(reader.read_flat(name, 0, flat.numel()), flat)


# --------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A run directory whose tokenizer is a Hugging Face byte-level BPE `tokenizer.json` (512 ids, trained
    with `tokenizers` on the stdlib corpus, as a released checkpoint brings its own) and whose shards the
    tiny config's shard stage made with it; no training."""
    from test_tokenizer_fast import stdlib_docs
    from xlp import tokenizer as tk

    root = tmp_path_factory.mktemp("data")
    tk.train_bytelevel_bpe(stdlib_docs("json", "email"), vocab_size=512).save_to(root / "bpe")
    run_dir = root / "run"
    run_dir.mkdir()
    r = subprocess.run([*XLP, "run", REPO / "configs" / "tiny.yaml", f"tokenizer.path={root / 'bpe' / 'tokenizer.json'}",
                        "--stages", "tokenizer,shard", "--run-dir", run_dir],
                       capture_output=True, text=True, cwd=run_dir, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    return run_dir


def _transformers_step_loss(model, batch: dict) -> float:
    """transformers' mean cross-entropy over a micro-batch, the state reset at each document start as our
    model does (each document run on its own)."""
    total, count = 0.0, 0
    for row in range(batch["input_ids"].shape[0]):
        ids, targets = batch["input_ids"][row], batch["targets"][row]
        starts = torch.nonzero(batch["doc_starts"][row]).flatten().tolist()
        bounds = sorted(set([0] + starts + [ids.numel()]))
        for a, b in zip(bounds, bounds[1:]):
            logits = model(ids[None, a:b]).logits[0].double()
            t = targets[a:b]
            keep = t != -100
            if keep.any():
                total += torch.nn.functional.cross_entropy(logits[keep], t[keep], reduction="sum").item()
                count += int(keep.sum())
    return total / count


@pytest.mark.slow  # tiny_data: the tokenizer and shard stages (Ray)
def test_a_tokenizer_larger_than_the_checkpoint_vocabulary_is_refused(tiny_data, tmp_path):
    from xlp.pipeline.train.trainer import resolve_vocab_size

    tok = tiny_data / "tokenizer" / "tokenizer.json"  # 512 ids
    cfg = ModelConfig(arch="xlstm_large", vocab_size=384, init_from=f"hf:{tmp_path}")
    with pytest.raises(ValueError, match=r"vocabulary has 384 ids, the run's tokenizer .* 512"):
        resolve_vocab_size(cfg, tok)
    assert resolve_vocab_size(ModelConfig(arch="xlstm_large", vocab_size=576, init_from=f"hf:{tmp_path}"), tok) == 576


@pytest.mark.slow  # a 2-rank ZeRO-3 training run of 20 steps
def test_continue_a_transformers_checkpoint_under_zero3(tiny_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from xlp import tokenizer as tk
    from xlp.pipeline.data.order import GlobalLoader

    # a tiny xLSTM made by transformers itself, saved in several shards with an index
    torch.manual_seed(0)
    hcfg = transformers.xLSTMConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_heads=4,
                                    tie_word_embeddings=False, chunk_size=64)
    theirs = transformers.xLSTMForCausalLM(hcfg)
    with torch.no_grad():  # move off the init (zero gate weights) so every weight matters
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = tmp_path / "ckpt"
    theirs.save_pretrained(ckpt, max_shard_size="200KB")
    assert (ckpt / "model.safetensors.index.json").is_file() and len(list(ckpt.glob("*.safetensors"))) > 2

    run = tmp_path / "run"
    run.mkdir()
    for stage in ("tokenizer", "shard"):  # the tokenizer and shards made once for the module
        shutil.copytree(tiny_data / stage, run / stage, symlinks=True)
    bpe = tiny_data.parent / "bpe" / "tokenizer.json"  # the same tokenizer.path: the data stages stay done
    r = subprocess.run([*XLP, "run", REPO / "configs" / "tiny.yaml", f"model.init_from=hf:{ckpt}",
                        f"tokenizer.path={bpe}", "model.num_blocks=2", "train.zero_stage=3", "train.steps=20", "train.save_every=20",
                        "train.eval_every=20", "--stages", "tokenizer,shard,train", "--run-dir", run],
                       capture_output=True, text=True, cwd=run, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    assert "= tokenizer: done" in r.stdout and "= shard: done" in r.stdout, r.stdout
    assert "each rank built its ZeRO-3 partitions and read only those" in (run / "train" / "stage.log").read_text()
    cfg = load_run_config(run / "config.yaml")
    assert cfg.model.arch == "xlstm_large" and cfg.model.d_model == 128 and cfg.model.vocab_size == 512
    # the export and `xlp generate` start now, beside the loss check below (each is mostly start-up)
    out, prompt = tmp_path / "export", "import json\n"
    export = subprocess.Popen([*XLP, "export", run, out, "--format", "hf"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    generate = subprocess.Popen([*XLP, "generate", run, "--prompt", prompt, "--max-new-tokens", "10",
                                 "--temperature", "0", "--ignore-eos"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    # the first step's loss is transformers' own on the same rows (2 ranks x 4 rows)
    rows = [next(iter(GlobalLoader(run / "shard", seq_len=cfg.data.seq_len, micro_batch_size=4, rows_per_step=8,
                                   rank=rank, world_size=2, seed=cfg.run.seed, streams=cfg.data.streams)))
            for rank in range(2)]
    theirs.eval()
    with torch.no_grad():
        want = sum(_transformers_step_loss(theirs, b) for b in rows) / 2
    first = json.loads((run / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and math.isclose(first["train/loss"], want, abs_tol=1e-4), (first["train/loss"], want)
    result = json.loads((run / "train" / "result.json").read_text())
    assert result["step"] == 20 and math.isfinite(result["final_loss"]) and result["params"] > 0

    # the --format hf export reloads in transformers, which greedy-decodes what `xlp generate` prints
    _, err = export.communicate(timeout=300)
    assert export.returncode == 0, err[-3000:]
    printed, err = generate.communicate(timeout=300)
    assert generate.returncode == 0, err[-3000:]
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    back.generation_config.eos_token_id = None  # as --ignore-eos
    tok = tk.load(run / "tokenizer" / "tokenizer.json")
    ids = torch.tensor([tok.encode(prompt, add_bos=False)])
    with torch.no_grad():
        new = back.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(new) == 10
    assert printed == prompt + tok.decode(new) + "\n"
