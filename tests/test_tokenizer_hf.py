"""Issue 30, item 1: any Hugging Face tokenizer. A real byte-level BPE tokenizer.json trained with
`tokenizers` on the stdlib corpus goes where a SentencePiece model went: the shard stage's encoding (real
shard_partition on real files: the shards decode back to the text, the non-English sample too), the
fingerprint, bits per byte, the native and hf exports (transformers' AutoTokenizer reloads it and encodes
the same ids) and `xlp generate`. A tokenizer without an end-of-text token is refused, naming its file."""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, XLP, xlp_env
from test_tokenizer_fast import NON_ENGLISH, stdlib_docs
from xlp import tokenizer as tk
from xlp.pipeline.core.config import load_config
from xlp.pipeline.core.layout import RunLayout
from xlp.pipeline.core.registry import STAGES
from xlp.pipeline.core.stage import fingerprints
from xlp.pipeline.data import listing

pytest.importorskip("tokenizers")
# lm-eval's datasets and transformers read local files here: no hub look-ups (they wait on the network)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# a document holding the end-of-text token's text: plain text here, never a document boundary
SPECIAL_TEXT = "a document that mentions <|endoftext|> and <|padding|> in its text\n"


@pytest.fixture(scope="module")
def bytelevel(tmp_path_factory) -> Path:
    """A GPT-NeoX-style byte-level BPE (vocab 1000) trained on the stdlib corpus, as a folder holding
    tokenizer.json (what a transformers checkpoint has)."""
    folder = tmp_path_factory.mktemp("hf-tok")
    tk.train_bytelevel_bpe(stdlib_docs("json", "email"), vocab_size=1000).save_to(folder)
    return folder


def held_out() -> list[str]:
    return stdlib_docs("asyncio")[:20] + NON_ENGLISH + [SPECIAL_TEXT]


def test_bytelevel_bpe_encodes_and_decodes_every_text(bytelevel):
    tok = tk.load(bytelevel / "tokenizer.json")
    assert isinstance(tok, tk.HFTokenizer) and tok.vocab_size == 1000
    # GPT-NeoX's specials: <|endoftext|> ends (and, without tokens of their own, begins) documents
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.unk_id) == (0, 1, 0, None)
    texts = held_out()
    one = tok.encode_batch(texts, num_threads=1)
    assert tok.encode_batch(texts, num_threads=2) == one == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in one] == texts  # every byte survives, Arabic and emoji too
    assert tok.eos_id not in one[-1]  # the special's text in a document is text
    assert tok.encode("x", add_bos=True, add_eos=True) == [0, *tok.encode("x"), 0]
    # bits per byte counts bytes from the tokens: each id's bytes sum to the decoded text's
    blen = tok.token_bytes()
    assert all(int(blen[ids].sum()) == len(t.encode()) for ids, t in zip(one, texts))
    back = pickle.loads(pickle.dumps(tok))  # how Ray ships it to the shard tasks
    assert back.encode_batch(texts) == one and back.sha256 == tok.sha256
    # the same tokenizer trained again is the same file
    again = tk.train_bytelevel_bpe(stdlib_docs("json", "email"), vocab_size=1000)
    assert again.sha256 == tok.sha256


def test_a_folder_and_its_config_give_the_roles(bytelevel, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((bytelevel / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|padding|>", "special": True}, "bos_token": "<|endoftext|>"}))
    tok = tk.load(folder)  # a transformers checkpoint folder: tokenizer.json and its config
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (1, 0, 1)
    assert tk.load(folder / "tokenizer.json").eos_id == 1  # the config beside a tokenizer.json counts too
    run = RunLayout(tmp_path / "run")
    tok.save_to(run.tokenizer_dir)  # what the tokenizer stage does: the roles travel with it
    assert run.tokenizer_model.name == "tokenizer.json"
    assert tk.load(run.tokenizer_model).eos_id == 1 and tk.load(run.tokenizer_model).sha256 == tok.sha256
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(tk.HFTokenizerError, match=r"ckpt/tokenizer.json: the eos_token '<\|im_end\|>' .* is not in"):
        tk.load(folder)


def test_a_tokenizer_without_end_of_text_is_refused_naming_it(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.train_from_iterator(stdlib_docs("json"), trainers.BpeTrainer(vocab_size=400, show_progress=False))
    path = tmp_path / "noeos" / "tokenizer.json"
    path.parent.mkdir()
    plain.save(str(path))
    with pytest.raises(tk.HFTokenizerError) as e:
        tk.load(path.parent)
    assert str(e.value).startswith(f"{path}: no end-of-text token (the shard stage ends every document")
    assert "<|endoftext|>" in str(e.value) and "eos_token in tokenizer_config.json" in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{\"not\": \"a tokenizer\"}")
    with pytest.raises(tk.HFTokenizerError, match=f"{bad}: not a Hugging Face tokenizer.json"):
        tk.load(bad)


def test_shards_made_with_it_decode_back_to_the_text(bytelevel, tmp_path):
    """The shard stage's own task (shard_partition) on real files, the non-English sample among them:
    split at <|endoftext|>, the shards' tokens decode to the documents the readers gave."""
    from xlp.pipeline.data.readers import ReadStats, iter_documents, resolve_sources
    from xlp.pipeline.data.shards import read_shard
    from xlp.pipeline.data.work import ReadOptions, ShardJob, shard_partition

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(stdlib_docs("json")[:6] + NON_ENGLISH + [SPECIAL_TEXT]):
        (corpus / f"doc{i:03d}.txt").write_text(doc)
    files = resolve_sources([str(corpus)])
    want = [d for f in files for d in iter_documents(f, stats=ReadStats())]
    tok = tk.load(bytelevel)
    out = tmp_path / "shard"
    job = ShardJob(partition=0, files=files, opts=ReadOptions(), out_dir=str(out), tokenizer=tok, dtype="<u2",
                   val_fraction=0.0, sample_tokens=512, shard_bytes=1 << 14, encoder_threads=2,
                   encode_batch_chars=4096)  # several batches
    rec = shard_partition(job, lambda *a: None)
    assert rec["encoder"] == "tokenizers" and rec["docs_written"]["train"] == len(want)
    tokens = np.concatenate([t for p in sorted(out.glob("*.tar"))
                             for _, t, _ in read_shard(p.read_bytes(), np.dtype("<u2"))])
    ends = np.nonzero(tokens == tok.eos_id)[0]
    docs = np.split(tokens, ends + 1)[:-1]
    assert len(docs) == len(want)
    assert [tok.decode(d.tolist()) for d in docs] == want


def test_fingerprint_hashes_the_tokenizer_files(bytelevel, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    data = (bytelevel / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(data)
    cfg = load_config(None, ["data.sources=[stdlib:json]", f"tokenizer.path={folder}"])
    base = fingerprints(STAGES, cfg)
    assert listing.tokenizer_file(cfg)["files"] == [["tokenizer.json", listing.sha256_file(folder / "tokenizer.json")]]
    st = (folder / "tokenizer.json").stat()
    # a special token renamed, same size, same mtime: only the content differs
    (folder / "tokenizer.json").write_bytes(data.replace(b"<|padding|>", b"<|padd1ng|>"))
    os.utime(folder / "tokenizer.json", ns=(st.st_atime_ns, st.st_mtime_ns))
    after = fingerprints(STAGES, cfg)
    assert {s for s in base if base[s] != after[s]} == {"tokenizer", "shard", "train", "eval"}
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<|padding|>"}')  # a role changes: so do they
    assert fingerprints(STAGES, cfg)["shard"] != after["shard"]


@pytest.fixture(scope="module")
def hf_run(bytelevel, tmp_path_factory):
    """A run directory as the tokenizer and train stages leave it: the byte-level tokenizer.json and a model
    (xLSTM-large, random weights, vocabulary 1024 > the tokenizer's 1000). Returns (RunLayout, the model).
    Read only by the tests (export, generate and the lm-eval adapter write elsewhere)."""
    from test_export import _random_large
    from xlp.xlstm_model import save_model

    run = RunLayout(tmp_path_factory.mktemp("hf-run") / "run")
    model = _random_large(vocab_size=1024)
    save_model(model, model.config, run.train.model_dir)
    tk.load(bytelevel).save_to(run.tokenizer_dir)
    return run, model


def test_exports_reload_in_transformers_and_generate(bytelevel, hf_run, tmp_path, capfd):
    """A run directory with a model and the byte-level tokenizer: `xlp export --format hf` writes a
    tokenizer AutoTokenizer loads and that encodes as ours; --format native keeps tokenizer.json; `xlp
    generate` reads the run and the hf export alike, and eval's byte lengths come from the tokenizer."""
    import torch

    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from xlp.pipeline import generate
    from xlp.pipeline.cli import main as xlp_main
    from xlp.pipeline.eval.common import token_byte_lengths
    from xlp.pipeline.export import CHECK_TEXTS
    from xlp.pipeline.trained import find_model

    run, model = hf_run
    tok = tk.load(bytelevel)
    assert xlp_main(["export", str(run.root), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert xlp_main(["export", str(run.root), str(tmp_path / "native"), "--format", "native"]) == 0
    assert {p.name for p in (tmp_path / "native").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in held_out()[:-1] + list(CHECK_TEXTS):  # (transformers matches specials' text by default)
        ids = tok.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids
        assert theirs.decode(ids) == text
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert theirs.eos_token_id == tok.eos_id == hf_config["eos_token_id"]

    texts = []
    for source in (run.root, tmp_path / "hf"):  # (the native export finds its tokenizer.json as find_model does)
        generate.run(str(source), "import json\n", max_new_tokens=6, temperature=0.0, stop_at_eos=False,
                     device="cpu", use_graph=False, use_compile=False)
        texts.append(capfd.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("import json\n")
    assert find_model(tmp_path / "native")[1] == tmp_path / "native" / "tokenizer.json"
    ids = torch.tensor([tok.encode("import json\n")])
    want = tok.decode(model.generate(ids, 6, temperature=0)[0, ids.shape[1]:].tolist())
    assert texts[0] == "import json\n" + want + "\n"

    blen = token_byte_lengths(tk.load(run.tokenizer_model), 1024)
    assert len(blen) == 1024 and blen[1000:].sum() == 0 and blen[tok.eos_id] == 0


def _val_shards(out: Path, tok, docs: list[str]) -> Path:
    """`docs` in the val split of a shard dir, each ending with <eos>, written as the shard stage writes
    them (its ShardWriter and manifest)."""
    from xlp.pipeline.data.shards import MANIFEST, ShardWriter, build_manifest

    out.mkdir(parents=True)
    writer = ShardWriter(out, "val", 0, dtype=np.dtype("<u2"), sample_tokens=512, shard_bytes=1 << 20)
    for ids in tok.encode_batch(docs, add_eos=True):
        writer.add_doc(np.asarray(ids, dtype=np.int64), "test")
    writer.close()
    manifest = build_manifest(out, dtype=np.dtype("<u2"), tokenizer_info={"eos_id": tok.eos_id, "sha256": tok.sha256},
                              config={}, read_counts={}, per_source={})
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def _split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The encoding of context + continuation cut by bytes: the continuation's tokens are those from the first
    one holding a byte of the continuation (the adapter cuts by decoded text; this counts token bytes)."""
    whole = tok.encode(context + continuation)
    cut = int(np.searchsorted(np.cumsum(tok.token_bytes()[whole]), len(context.encode()), side="right"))
    return whole[:cut], whole[cut:]


def _direct_logprobs(model, tok, ctx: list[int], cont: list[int]):
    """(log-probabilities of `cont`'s tokens after <eos> + ctx, whether each is the argmax), from one plain
    forward pass of one row in float64 (the state reset at the first context token, as a document in
    training): no batching, padding, windows or recurrent steps."""
    import torch

    full = [tok.eos_id] + ctx + cont
    x = torch.tensor([full[:-1]])
    d = torch.zeros_like(x, dtype=torch.bool)
    d[0, :2] = True
    with torch.no_grad():
        logp = torch.log_softmax(model(x, doc_starts=d)[0].double(), dim=-1)[len(ctx):]
    tgt = torch.tensor(cont)
    return logp.gather(-1, tgt[:, None])[:, 0], logp.argmax(-1) == tgt


# a held-out document of mixed scripts for the cloze items and bits per byte: its lines 4 and 5 are cloze
# candidates (an ASCII word in them) after Cyrillic, CJK and Arabic lines
MIXED = "\n".join(NON_ENGLISH[:5]) + "\nKöln, Zürich and Malmö: größe_wert = 3\n"


@pytest.fixture
def one_thread():
    """torch on one thread for the test, as before after it: tiny ops only contend on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lm_eval_adapter_scores_with_a_bytelevel_tokenizer(hf_run, one_thread, tmp_path):
    """lm-evaluation-harness driving `--model xlp` on a run whose tokenizer is a byte-level BPE tokenizer.json
    (the eval stage's cloze items from val shards of code and mixed-script text): loglikelihood and
    multiple choice equal the model's own log-probabilities of the same tokens; loglikelihood_rolling is
    their sum over the text (and lm-eval's bits per byte follows from it); generate_until is the model's
    greedy decode, cut at the stop string, and stops at any stop string."""
    import torch
    from lm_eval.api.instance import Instance

    from xlp.pipeline.eval.cloze import build_items, write_items, write_task_dir
    from xlp.pipeline.eval.harness import XLPLM, run_tasks

    run, model = hf_run
    lm = XLPLM(run_dir=str(run.root), device="cpu", batch_size=3, max_length=4096)
    tok = lm.tok
    assert isinstance(tok, tk.HFTokenizer) and lm.tokenizer_name.startswith("xlp-hf-") and lm.eot_token_id == 0
    docs = stdlib_docs("asyncio")[:3] + [MIXED]
    items = build_items(_val_shards(tmp_path / "shard", tok, docs), tok, n_items=4, context_chars=200, seed=0)
    assert len(items) == 4 and any("Москва" in it["context"] for it in items)
    write_task_dir(tmp_path / "tasks", write_items(items, tmp_path / "cloze.jsonl"))
    res = run_tasks(lm, ["xlp_cloze", "xlp_cloze_mc", "xlp_heldout", "xlp_cloze_gen"], include_path=tmp_path / "tasks",
                    limit=4, log_samples=True)
    samples = res["samples"]
    n = apart = 0
    for task in ("xlp_cloze", "xlp_cloze_mc"):
        for s in samples[task]:
            for args, resp in zip(s["arguments"], s["resps"]):
                ctx, cont = _split(tok, args[0], args[1])
                lp, top = _direct_logprobs(model, tok, ctx, cont)
                assert resp[0][0] == pytest.approx(float(lp.sum()), abs=2e-3, rel=1e-4), (task, args[1])
                assert bool(resp[0][1]) == bool(top.all())
                apart += tok.encode(args[0]) + tok.encode(args[1]) != ctx + cont
                n += 1
    # some contexts end with a blank line: "\n\n" is one token there, but "\n", "\n" before the next line
    assert apart > 0
    nll = nbytes = 0.0
    for s in samples["xlp_heldout"]:  # one window (max_length 4096): every token of the text, once
        text = s["arguments"][0][0]
        lp, _ = _direct_logprobs(model, tok, [], tok.encode(text))
        assert s["resps"][0][0] == pytest.approx(float(lp.sum()), abs=2e-3, rel=1e-4)
        nll, nbytes = nll - float(lp.sum()), nbytes + len(text.encode())
        n += 1
    # lm-eval's bits per byte: UTF-8 bytes of the texts (the mixed-script one has more bytes than characters)
    assert res["results"]["xlp_heldout"]["bits_per_byte,none"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-4)
    for s in samples["xlp_cloze_gen"]:  # greedy until "\n" = the model's own greedy decode, cut there
        ids = torch.tensor([tok.encode(s["arguments"][0][0])])
        want = tok.decode(model.generate(ids, 48, temperature=0)[0, ids.shape[1]:].tolist())
        got = s["resps"][0][0]
        assert "\n" not in got and (want.split("\n")[0] == got if "\n" in want else want.startswith(got))
        n += 1
    assert n == 4 + 16 + 4 + 4

    # a stop string taken from the greedy text itself: the output ends right before its first occurrence
    context = items[0]["context"]
    ids = torch.tensor([tok.encode(context)])
    greedy = tok.decode(model.generate(ids, 24, temperature=0)[0, ids.shape[1]:].tolist())
    stop = next(greedy[i:i + 2] for i in range(4, len(greedy) - 2) if "\ufffd" not in greedy[i:i + 2])
    req = Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 24}), 0)
    assert lm.generate_until([req]) == [greedy[:greedy.index(stop)]]


def test_bits_per_byte_counts_the_utf8_bytes_of_bytelevel_tokens(hf_run, tmp_path):
    """The eval stage's bits per byte (ppl.perplexity over val shards, byte lengths from the tokenizer) on
    mixed-script text, tokenized by a byte-level BPE whose tokens can hold parts of a character: -sum(log2 p)
    over the predicted tokens / the text's UTF-8 bytes, computed here by hand."""
    import torch

    from xlp.pipeline.eval.common import token_byte_lengths
    from xlp.pipeline.eval.ppl import perplexity

    run, model = hf_run
    tok = tk.load(run.tokenizer_model)
    ids = tok.encode(MIXED)
    nbytes = len(MIXED.encode())
    assert nbytes > len(MIXED) + 100  # Cyrillic, CJK, Arabic, emoji: bytes, not characters, count
    # the val stream: an empty document's <eos>, then MIXED and its <eos>: one row predicts MIXED and its <eos>
    shard_dir = _val_shards(tmp_path / "shard", tok, ["", MIXED])
    res = perplexity({"trained": model}, shard_dir, seq_len=len(ids) + 1, batch_size=1, max_batches=0,
                     byte_lengths=token_byte_lengths(tok, model.config.vocab_size), device=torch.device("cpu"),
                     log=lambda *a: None)
    lp, _ = _direct_logprobs(model, tok, [], ids + [tok.eos_id])
    assert (res["trained"]["tokens"], res["trained"]["bytes"]) == (len(ids) + 1, nbytes)
    assert res["trained"]["bpb"] == pytest.approx(-float(lp.sum()) / math.log(2) / nbytes, rel=1e-5)


@pytest.mark.slow  # Ray: xlp run's tokenizer and shard stages
def test_xlp_run_shards_with_a_tokenizer_json_and_trains_a_bytelevel_bpe(bytelevel, tmp_path):
    """`xlp run` with tokenizer.path=a transformers-style folder: the tokenizer stage takes it whole, the
    shard stage encodes with it (its own threads), and the shards decode back to the corpus, the
    non-English sample too. tokenizer.type=bytelevel_bpe trains such a tokenizer on the sample instead."""
    from xlp.pipeline.data.readers import ReadStats, iter_documents, resolve_sources
    from xlp.pipeline.data.shards import read_shard

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(stdlib_docs("json") + NON_ENGLISH):
        (corpus / f"doc{i:03d}.txt").write_text(doc)
    want = sorted(d for f in resolve_sources([str(corpus)]) for d in iter_documents(f, stats=ReadStats()))

    def run(name: str, *overrides: str) -> Path:
        r = subprocess.run([*XLP, "run", str(REPO / "configs" / "tiny.yaml"), "--stages", "tokenizer,shard",
                            "--run-dir", str(tmp_path / name), f"data.sources=[{corpus}]",
                            "data.partition_bytes=40000", *overrides],
                           env=xlp_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return tmp_path / name

    def decoded(run_dir: Path):
        manifest = json.loads((run_dir / "shard" / "manifest.json").read_text())
        tok = tk.load(RunLayout(run_dir).tokenizer_model)
        assert manifest["tokenizer"]["sha256"] == tok.sha256 and manifest["tokenizer"]["eos_id"] == tok.eos_id
        docs = []
        for shard in manifest["shards"]:
            tokens = np.concatenate([t for _, t, _ in read_shard((run_dir / "shard" / shard["path"]).read_bytes(),
                                                                 np.dtype("<u2"))])
            docs += [tok.decode(d.tolist()) for d in np.split(tokens, np.nonzero(tokens == tok.eos_id)[0] + 1)[:-1]]
        return tok, json.loads((run_dir / "shard" / "stage.json").read_text())["metrics"], sorted(docs)

    given = run("given", f"tokenizer.path={bytelevel}")
    assert (given / "tokenizer" / "tokenizer.json").read_bytes() == (bytelevel / "tokenizer.json").read_bytes()
    stats = json.loads((given / "tokenizer" / "stats.json").read_text())
    assert stats["kind"] == "hf" and stats["specials"] == {"pad": 1, "unk": None, "bos": 0, "eos": 0}
    tok, metrics, docs = decoded(given)
    assert metrics["encoder"] == "tokenizers" and metrics["partitions"] >= 2
    assert docs == want

    trained = run("trained", "tokenizer.type=bytelevel_bpe", "tokenizer.vocab_size=600")
    tok, metrics, docs = decoded(trained)
    assert isinstance(tok, tk.HFTokenizer) and tok.vocab_size == 600 and docs == want
