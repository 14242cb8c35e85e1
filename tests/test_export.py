"""Issue 9: the model leaves the pipeline. `xlp export` (hf, native), import (`model.init_from`),
`xlp generate`, and the preallocated-state step decoder.

One real tiny run (tokenizer -> shard -> 2 training steps, arch xlstm_large) is made per module
(~1 min on 2 CPU cores); XLP_TEST_TINY_RUN=DIR reuses an existing one.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xlp.xlstm_model import ModelConfig, build_model, load_model, save_model
from xlp.xlstm_model import hf
from xlp.xlstm_model.decode import StepDecoder, fused_wanted, generate_stream, prefill

REPO = Path(__file__).resolve().parents[1]
BENCH_DECODE = REPO / "benchmarks" / "bench_decode.py"  # run as a script: python benchmarks/bench_decode.py
XLP = [sys.executable, "-m", "xlp.pipeline.cli"]

transformers = pytest.importorskip("transformers")


def _xlp(*args, cwd=None, timeout=600):
    env = dict(os.environ)
    return subprocess.run([*XLP, *map(str, args)], capture_output=True, text=True, cwd=cwd or REPO, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    reuse = os.environ.get("XLP_TEST_TINY_RUN")
    if reuse and (Path(reuse) / "train" / "model" / "config.json").is_file():
        return Path(reuse)
    run_dir = tmp_path_factory.mktemp("tiny_large")
    r = _xlp("run", REPO / "configs" / "tiny.yaml", "model=tiny_xlstm_large", "model.slstm_at=[]",
             "train.steps=2", "train.save_every=2", "train.eval_every=2",
             "--stages", "tokenizer,shard,train", "--run-dir", run_dir, cwd=run_dir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def hf_export(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "export"
    r = _xlp("export", tiny_run, out, "--format", "hf")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _random_large(seed=0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(arch="xlstm_large", vocab_size=384, d_model=128, num_blocks=2, num_heads=4,
                                tie_weights=True, norm_eps=1e-6), **kw})
    model = build_model(cfg).eval()
    with torch.no_grad():  # move off the init (zero gate weights) so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# ------------------------------------------------------------------------------------ hf export
@pytest.mark.slow  # tiny_run: a 2-rank training run
def test_hf_export_logits_match_transformers(hf_export, tiny_run):
    from transformers import AutoModelForCausalLM

    cfg = json.loads((hf_export / "config.json").read_text())
    assert cfg["model_type"] == "xlstm" and cfg["architectures"] == ["xLSTMForCausalLM"]
    theirs = AutoModelForCausalLM.from_pretrained(hf_export, dtype=torch.float32).eval()
    ours = load_model(tiny_run / "train" / "model").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_hf_roundtrip_random_weights(tmp_path, tie):
    """Perturbed weights (nonzero gate matrices, untied head): transformers' forward and generate agree
    with ours, and the import reproduces our logits exactly."""
    from transformers import AutoModelForCausalLM

    ours = _random_large(tie_weights=tie)
    hf.save_hf(ours, ours.config, tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 384, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(ids)
        assert (a - theirs(ids).logits).abs().max().item() < 1e-4
        back = hf.load_hf_model(tmp_path).eval()
        assert torch.equal(back(ids), a)
        g_theirs = theirs.generate(ids[:1, :12], max_new_tokens=6, do_sample=False)
    assert torch.equal(g_theirs, ours.generate(ids[:1, :12], 6, temperature=0))


@pytest.mark.slow  # tiny_run: a 2-rank training run
def test_hf_tokenizer_round_trip(hf_export, tiny_run):
    from transformers import AutoTokenizer

    from xlp import tokenizer as tk
    from xlp.pipeline.export import CHECK_TEXTS

    ours = tk.load(tiny_run / "tokenizer" / "tokenizer.model")
    theirs = AutoTokenizer.from_pretrained(hf_export)
    rng = random.Random(0)
    alphabet = "abcXYZ019 \t\n\r_-+=(){}[]:;'\"#éü世界😀\u00a0"
    texts = list(CHECK_TEXTS) + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(30)]
    texts.append((REPO / "xlstm_model" / "hf.py").read_text()[:3000])
    for text in texts:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert theirs.decode(ids) == ours.decode(ids) == text
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)


# ------------------------------------------------------------------------------------- import
@pytest.mark.slow  # tiny_run: a 2-rank training run
def test_import_reproduces_logits_and_init_from(hf_export, tiny_run):
    ours = load_model(tiny_run / "train" / "model").eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 70))
    with torch.no_grad():
        want = ours(ids)
        assert torch.allclose(hf.load_hf_model(hf_export).eval()(ids), want, atol=1e-6, rtol=0)
        # init_from on a freshly initialised model of the run's config (as the train stage does)
        cfg = ModelConfig(**{**ours.config.__dict__, "init_from": f"hf:{hf_export}"})
        fresh = build_model(cfg).eval()
        assert not torch.allclose(fresh(ids), want)
        hf.init_from(fresh, cfg.init_from)
        assert torch.allclose(fresh(ids), want, atol=1e-6, rtol=0)
        assert fresh.head.weight is fresh.embedding.weight  # ties survive
        other = build_model(ModelConfig(**{**cfg.__dict__, "d_model": 256, "num_heads": 4})).eval()
    with pytest.raises(ValueError, match=r"model\.d_model=128 \(run has 256\)"):
        hf.init_from(other, cfg.init_from)


def test_init_from_native(tmp_path):
    model = _random_large(tie_weights=False)
    save_model(model, model.config, tmp_path)
    fresh = build_model(ModelConfig(**{**model.config.__dict__, "init_from": f"native:{tmp_path}"}))
    hf.init_from(fresh, fresh.config.init_from)
    for (n, p), q in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("spec", ["hf", "hf:", "gguf:/x", "/just/a/path"])
def test_init_from_validated(spec):
    with pytest.raises(ValueError, match="model.init_from"):
        ModelConfig(arch="xlstm_large", init_from=spec).validate()


# ---------------------------------------------------------------------------- refusals, native
@pytest.mark.parametrize("kw,match", [
    (dict(arch="xlstm", d_model=64), "arch='xlstm'.*--format native"),
    (dict(arch="llama", d_model=64), "arch='llama'.*--format native"),
    (dict(arch="xlstm_large", head_norm="rms"), "head_norm='rms'"),
    (dict(arch="xlstm_large", gate_soft_cap=0.0), "gate_soft_cap=0"),
    (dict(arch="xlstm_large", logit_soft_cap=0.0), "logit_soft_cap=0"),
    (dict(arch="xlstm_large", qk_dim_factor=0.25), "qk_dim_factor: width 32"),
])
def test_hf_export_refuses_unmappable(kw, match):
    cfg = ModelConfig(**{**dict(vocab_size=384, d_model=128, num_heads=4), **kw})
    with pytest.raises(hf.HFConversionError, match=match):
        hf.to_hf_config(cfg)


def test_old_xlstm_large_checkpoints_keep_rms_head_norm(tmp_path):
    model = _random_large()
    save_model(model, model.config, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    del data["model"]["head_norm"], data["model"]["init_from"]  # as written before issue 9
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert load_model(tmp_path).config.resolved_head_norm == "rms"


@pytest.mark.slow  # tiny_run: a 2-rank training run
@pytest.mark.parametrize("arch", ["xlstm", "llama"])
def test_native_export_and_hf_refusal_cli(tiny_run, tmp_path, arch):
    """A run directory holding an xlstm (sLSTM) or llama model: native export works (and generates);
    --format hf fails with a message naming the arch."""
    run = tmp_path / "run"
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=512, d_model=64, num_blocks=2, num_heads=4,
                      slstm_at=[1] if arch == "xlstm" else [])
    model = build_model(cfg).eval()
    save_model(model, cfg, run / "train" / "model")
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer.model").write_bytes((tiny_run / "tokenizer" / "tokenizer.model").read_bytes())
    r = _xlp("export", run, tmp_path / "hf", "--format", "hf")
    assert r.returncode == 1 and f"model.arch='{arch}'" in r.stderr and "--format native" in r.stderr
    assert "Traceback" not in r.stderr
    r = _xlp("export", run, tmp_path / "native", "--format", "native")
    assert r.returncode == 0, r.stderr
    back = load_model(tmp_path / "native")
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    assert (tmp_path / "native" / "tokenizer.model").is_file()


def test_export_refuses_an_existing_export_and_force_keeps_it(tmp_path, capfd):
    """Issue 29, item 12: `xlp export` wrote over an existing output directory. Now it refuses, naming
    it and the fix; --force replaces an earlier export and keeps it aside; a folder that is not an
    export is never replaced."""
    from xlp import tokenizer as tk
    from xlp.pipeline.cli import main as xlp_main

    run = tmp_path / "run"
    model = _random_large(vocab_size=300)
    save_model(model, model.config, run / "train" / "model")
    (run / "tokenizer").mkdir()
    docs = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(300)]
    tk.train(docs, vocab_size=300, model_type="bpe").save(run / "tokenizer" / "tokenizer.model")
    out = tmp_path / "exported"
    out.mkdir()  # an empty directory is written into
    assert xlp_main(["export", str(run), str(out), "--format", "native"]) == 0
    assert f"to {out}" in capfd.readouterr().err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"config.json", "model.safetensors", "tokenizer.model"}

    assert xlp_main(["export", str(run), str(out), "--format", "native"]) == 1
    err = capfd.readouterr().err
    assert f"xlp export: error: {out} already holds an export (config.json, model.safetensors, tokenizer.model): " \
           "nothing was written; give another output path, or add --force to replace it" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run"]  # no partial export left

    assert xlp_main(["export", str(run), str(out), "--format", "native", "--force"]) == 0
    err = capfd.readouterr().err
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("exported.replaced-")]
    assert len(kept) == 1 and {p.name: p.read_bytes() for p in kept[0].iterdir()} == before
    assert f"the previous export in {out} is kept in {kept[0]} (--force" in err, err
    assert (out / "model.safetensors").read_bytes() == before["model.safetensors"]

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert xlp_main(["export", str(run), str(notes), "--format", "native", "--force"]) == 1
    assert f"{notes} exists and holds files that are not an export (todo.txt)" in capfd.readouterr().err
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


# ----------------------------------------------------------------------------------- generate
@pytest.mark.slow  # tiny_run: a 2-rank training run
def test_xlp_generate_on_real_run_and_exports(tiny_run, hf_export, tmp_path):
    assert _xlp("export", tiny_run, tmp_path / "nat", "--format", "native").returncode == 0
    outs = []
    for source in (tiny_run, tmp_path / "nat", hf_export):
        r = _xlp("generate", source, "--prompt", "import json\n", "--max-new-tokens", "12", "--seed", "3",
                 "--top-k", "40", "--top-p", "0.95", "--temperature", "0.9", "--ignore-eos")
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.startswith("import json\n") and len(r.stdout) > len("import json\n") + 1
        assert "12 tokens" in r.stderr and "tokens/s" in r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1] == outs[2]  # same weights, seed and sampler: the same text
    # greedy (the decoder's argmax path) prints the tokens LanguageModel.generate picks
    r = _xlp("generate", tiny_run, "--prompt", "import json\n", "--max-new-tokens", "10", "--temperature", "0",
             "--ignore-eos")
    assert r.returncode == 0 and "10 tokens" in r.stderr, r.stderr[-2000:]
    from xlp import tokenizer as tk
    from xlp.pipeline.trained import find_model, load_any

    model_dir, tok_path = find_model(Path(tiny_run))
    tok, model = tk.load(tok_path), load_any(model_dir).eval()
    ids = torch.tensor([tok.encode("import json\n", add_bos=False)])
    want = tok.decode(model.generate(ids, 10, temperature=0)[0, ids.shape[1]:].tolist())
    assert r.stdout == "import json\n" + want + "\n"  # the CLI ends the text with a newline
    # decode.* / kernels.* over the run's settings: the fused step (reference kernels on CPU) picks the same tokens
    r = _xlp("generate", tiny_run, "--prompt", "import json\n", "--max-new-tokens", "10", "--temperature", "0",
             "--ignore-eos", "decode.fused=true", "kernels.backend=reference")
    assert r.returncode == 0 and r.stdout == "import json\n" + want + "\n", r.stderr[-2000:]
    r = _xlp("generate", tmp_path / "nowhere", "--prompt", "x")
    assert r.returncode == 1 and "xlp generate: error" in r.stderr
    r = _xlp("generate", tiny_run, "--prompt", "x", "decode.mix=7x3")
    assert r.returncode == 1 and "xlp generate: error: decode.mix='7x3'" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow  # tiny_run: a 2-rank training run
def test_model_settings_come_from_the_run_config(tiny_run, tmp_path):
    """generate / export run the model with the run's kernels.* and decode.* (defaults for an export
    directory), changed by kernels.* / decode.* overrides only."""
    import yaml

    from xlp.kernels.config import KernelsConfig
    from xlp.pipeline.core.config import ConfigError
    from xlp.pipeline.trained import model_settings

    run = tmp_path / "run"
    run.mkdir()
    data = yaml.safe_load((tiny_run / "config.yaml").read_text())
    data["kernels"] = {"backend": "reference", "mlstm": {"bc_w": 4}}
    data["decode"] = {"pdl": True}
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    k, d = model_settings(run, ["decode.mix=32768x8"])
    assert k == KernelsConfig(backend="reference", mlstm={"bc_w": 4}) and d.pdl and d.mix_launch() == (32768, 8)
    assert model_settings(tmp_path)[0] == KernelsConfig()  # no config.yaml: the defaults
    for item, words in (("train.steps=1", "only kernels.* and decode.* keys"),
                        ("kernels.backend=cuda", "`kernels.backend` is 'cuda'; valid values: auto, reference, triton"),
                        ("kernels.mlstm.xx=2", "kernels.mlstm: unknown key 'xx'; valid: fs_bk"),
                        ("decode.nope=1", "unknown config key `decode.nope`")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            model_settings(run, [item])


# ------------------------------------------------------------------------------ step decoder
def _tiny_model_after_prompt(arch: str, perturb: bool = False, **overrides):
    """A 2-block model of `arch`, a random prompt (2, 37) and the state after it (read in segments)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=128, d_model=64, num_blocks=2, num_heads=4,
                      slstm_at=[1] if arch == "xlstm" else [], **overrides)
    model = build_model(cfg).eval()
    if perturb:  # away from the small init, so every part of a block matters
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 128, (2, 37))
    with torch.no_grad():
        _, state = prefill(model, ids, segment=16)
    return model, ids, state


@pytest.mark.parametrize("arch", ["xlstm_large", "xlstm", "llama"])
def test_step_decoder_equals_model_step(arch):
    """The preallocated-state decoder (graph path off on CPU) gives model.step's logits exactly, and
    generate_stream greedy equals LanguageModel.generate greedy."""
    model, ids, state = _tiny_model_after_prompt(arch)
    with torch.no_grad():
        _, ref_state = model.forward_with_state(ids)
        dec = StepDecoder(model, state, 2, use_graph=True)  # CPU: graphs requested but not used
        assert dec.graph is None and not dec.use_graph and dec.static == (arch != "llama")
        token = ids[:, -1]
        for _ in range(4):
            want, ref_state = model.step(token, ref_state)
            got = dec.step(token)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            token = want.argmax(-1)
    stream = torch.stack(list(generate_stream(model, ids, 6, temperature=0)), dim=1)
    assert torch.equal(stream, model.generate(ids, 6, temperature=0)[:, ids.shape[1]:])


@pytest.mark.parametrize("vocab", [512, 50304, 96, 130])  # two-pass (256- and 32-blocks) and one-pass sizes
def test_greedy_token_is_the_first_argmax(vocab):
    """The decoder's two-pass argmax picks what torch.argmax picks, ties (first maximum) included,
    in bf16 logits as on GPU."""
    from xlp.xlstm_model.decode import greedy_token

    torch.manual_seed(0)
    logits = torch.randn(5, vocab).bfloat16()
    logits[1, vocab // 3] = logits[1, vocab - 1] = 9.0  # a tie across blocks
    logits[2, 7] = logits[2, 8] = 9.0  # a tie inside a block
    logits[3] = 0.0  # all equal
    assert torch.equal(greedy_token(logits), logits.argmax(-1))
    assert greedy_token(logits)[3] == 0


def test_step_greedy_follows_step():
    """step_greedy returns the argmax of the step's logits, and a result fed back is the next input."""
    model, ids, state = _tiny_model_after_prompt("xlstm_large")
    with torch.no_grad():
        ref = StepDecoder(model, [tuple(t.clone() for t in s) for s in state], 2)
        dec = StepDecoder(model, state, 2)
        token = ids[:, -1]
        for _ in range(3):
            want = ref.step(token).argmax(-1)
            token = dec.step_greedy(token)
            assert torch.equal(token, want)


def test_greedy_tokens_and_eos():
    """greedy_tokens gives step_greedy's sequence; generate_stream greedy with an eos equals
    LanguageModel.generate, and until_eos stops pulling from its source once every row is done."""
    from xlp.xlstm_model.lm import until_eos

    model, ids, state = _tiny_model_after_prompt("xlstm_large")
    with torch.no_grad():
        ref = StepDecoder(model, [tuple(t.clone() for t in s) for s in state], 2)
        dec = StepDecoder(model, state, 2)
        token = ids[:, -1]
        got = list(dec.greedy_tokens(token, 5))
        want = []
        for _ in range(5):
            token = ref.step_greedy(token)
            want.append(token)
        assert all(torch.equal(g, w) for g, w in zip(got, want)) and len(got) == 5
    plain = model.generate(ids, 8, temperature=0)[:, ids.shape[1]:]
    eos = int(plain[0, 2])  # row 0 emits it third; row 1 maybe never
    stream = torch.stack(list(generate_stream(model, ids, 8, temperature=0, eos=eos)), dim=1)
    assert torch.equal(stream, model.generate(ids, 8, temperature=0, eos=eos)[:, ids.shape[1]:])
    assert (stream[0, 2:] == eos).all()

    pulled = []

    def source():
        for t in ([5, 1], [7, 7], [9, 9], [4, 4]):
            pulled.append(t)
            yield torch.tensor(t)
    out = [t.tolist() for t in until_eos(source(), eos=7)]
    assert out == [[5, 1], [7, 7]] and len(pulled) == 2
    out = [t.tolist() for t in until_eos(iter([torch.tensor([7, 1]), torch.tensor([2, 7])]), eos=7)]
    assert out == [[7, 1], [7, 7]]


def test_bench_decode_runs_on_cpu():
    """The benchmark, with a variant (the fused step) measured beside the base decoder in one run."""
    r = subprocess.run([sys.executable, str(BENCH_DECODE), "--model", "tiny_xlstm_large",
                        "--contexts", "64,256", "--new-tokens", "8", "--vocab-size", "512",
                        "--variant", "fused:fused=1"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "command:" in r.stdout and "machine:" in r.stdout and "variant fused: fused=True" in r.stdout
    assert re.search(r"^command: .*benchmarks/bench_decode\.py --model tiny_xlstm_large --contexts 64,256 ",
                     r.stdout, re.M), r.stdout
    for ctx in (64, 256):
        base = re.search(rf"^context +{ctx}: .*fused=False .*same argmax True; greedy tokens = step\+argmax: "
                         rf"graph 8/8, run-ahead 8/8$", r.stdout, re.M)
        fused = re.search(rf"^context +{ctx} \[fused\]: .*fused=True .*same argmax True", r.stdout, re.M)
        assert base and fused, r.stdout
    assert re.search(r"^ms/token \[fused\] vs base: 64: [0-9.]+x  256: [0-9.]+x$", r.stdout, re.M), r.stdout
    assert len(re.findall(r"run-ahead \(xlp generate --temperature 0\) +[0-9.]+ tokens/s", r.stdout)) == 4


def _load_bench_decode():
    """benchmarks/bench_decode.py as a module, loaded from its file (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH_DECODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_decode_variant_errors_name_the_bad_part():
    bench_decode = _load_bench_decode()
    parse_settings, parse_variant = bench_decode.parse_settings, bench_decode.parse_variant

    assert parse_variant("pdl:pdl=1,cuda_graph=0,mix=32768x8") == (
        "pdl", {"pdl": True, "cuda_graph": False, "mix": "32768x8"})
    valid = "valid: pdl, mix, fused, compile, cuda_graph"
    for spec, words in (("pdl", "NAME:key=value"), ("base:pdl=1", "other than 'base'"),
                        ("x:tune=1", f"unknown key 'tune'; {valid} (compile_mode, matvec and tune are the same for "
                                     "every decoder of a run: give them with --decode)"),
                        ("x:XLP_DECODE_PDL=1", f"unknown key 'XLP_DECODE_PDL'; {valid}"),
                        ("x:pdl", "'pdl' is not key=value"), ("x:pdl=maybe", "'pdl=maybe': Value 'maybe' is not a valid bool")):
        with pytest.raises(ValueError, match=re.escape(words)):
            parse_variant(spec)
    assert parse_settings("tune=1,matvec=gemm", "--decode") == {"tune": True, "matvec": "gemm"}
    with pytest.raises(ValueError, match=re.escape("--decode: unknown key 'nope'; valid: cuda_graph, compile, "
                                                   "compile_mode, matvec, tune, fused, pdl, mix")):
        parse_settings("nope=1", "--decode")
    r = subprocess.run([sys.executable, str(BENCH_DECODE), "--variant", "a:pdl=1",
                        "--variant", "a:pdl=0"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "each variant needs its own NAME" in r.stderr
    r = subprocess.run([sys.executable, str(BENCH_DECODE), "--decode", "matvec=fast"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "config key `decode.matvec` is 'fast'; valid values: reduce, gemm" in r.stderr


def test_bench_decode_reports_a_variant_that_fails_and_keeps_the_others():
    """A variant whose decoder cannot be set up (here: a bad decode.mix for the fused Triton step, run
    by the interpreter; refused when its decoder is built) is reported with its error; the base is
    still measured; exit 1."""
    env = dict(os.environ, TRITON_INTERPRET="1", XLP_KERNEL_BACKEND="triton")
    r = subprocess.run([sys.executable, str(BENCH_DECODE), "--model", "tiny_xlstm_large",
                        "--contexts", "16", "--new-tokens", "8", "--warmup", "1", "--vocab-size", "512",
                        "--device", "cpu", "--variant", "bad:fused=1,mix=7x3"],
                       capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert re.search(r"^context +16 \[bad\]: FAILED to set up: ValueError: decode.mix='7x3'", r.stdout, re.M), out
    assert re.search(r"^context +16: +[0-9.]+ tokens/s", r.stdout, re.M), out
    assert "FAILED to set up: bad" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["xlstm_large", "xlstm"])
def test_compiled_step_decoder_matches_model_step(arch):
    """The torch.compile'd step (the GPU default; here inductor's CPU backend, same trace: the ops through
    their reference, matrix-vector products as reductions) gives model.step's logits, and a
    second decoder on the same model reuses the compiled graph instead of compiling again."""
    from torch._dynamo.utils import counters

    model, ids, state = _tiny_model_after_prompt(arch)
    with torch.no_grad():
        _, ref_state = model.forward_with_state(ids)
        dec = StepDecoder(model, state, 2, use_compile=True)
        assert dec.compiled and dec.graph is None
        token = ids[:, -1]
        for _ in range(3):
            want, ref_state = model.step(token, ref_state)
            torch.testing.assert_close(dec.step(token), want, atol=1e-4, rtol=1e-4)
            token = want.argmax(-1)
        graphs = counters["stats"]["unique_graphs"]
        again = StepDecoder(model, state, 2, use_compile=True)
        want, _ = model.step(token, state)
        torch.testing.assert_close(again.step(token), want, atol=1e-4, rtol=1e-4)
        assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("head_norm", ["layer", "rms"])
def test_fused_step_reference_matches_model_step(head_norm):
    """The fused decode step (kernels.decode_linear / mlstm_decode_mix, reference backend on CPU) is
    the same computation as model.step, state included; other architectures say they have none."""
    model, ids, state = _tiny_model_after_prompt("xlstm_large", perturb=True, head_norm=head_norm)
    with torch.no_grad():
        dec = StepDecoder(model, state, 2, use_fused=True)
        assert dec.fused and not dec.compiled
        token = ids[:, -1]
        for _ in range(4):
            want, state = model.step(token, state)
            torch.testing.assert_close(dec.step(token), want, atol=1e-5, rtol=1e-5)
            token = want.argmax(-1)
        for got, ref in zip(dec.buffers, torch.utils._pytree.tree_flatten(state)[0]):
            torch.testing.assert_close(got, ref.to(got.dtype), atol=1e-5, rtol=1e-5)
    llama = build_model(ModelConfig(arch="llama", vocab_size=128, d_model=64, num_blocks=1, num_heads=4)).eval()
    with pytest.raises(ValueError, match="no fused decode step for arch 'llama'"):
        fused_wanted(llama, True)
