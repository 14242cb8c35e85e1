"""`xlp export`: take a trained model out of the pipeline.

  --format native   our safetensors + config.json + tokenizer.model (every arch; `xlp generate` and
                    `model.init_from=native:DIR` read it)
  --format hf       transformers' xLSTM (arch xlstm_large only): config.json (model_type xlstm) +
                    model.safetensors with its weight names + a transformers tokenizer built from our
                    SentencePiece model, so AutoModelForCausalLM / AutoTokenizer.from_pretrained(OUT)
                    load it without this package.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from xlp import tokenizer as tk
from xlp.pipeline.trained import TOKENIZER_FILE, ExportError, find_model, load_any, model_settings
from xlp.xlstm_model import load_config, save_model
from xlp.xlstm_model.hf import save_hf, to_hf_config

FORMATS = ("hf", "native")
# Texts the exported transformers tokenizer must encode exactly as our SentencePiece model does.
CHECK_TEXTS = (
    "def f(x):\n\tif x  >= 10:\n        return 'héllo 世界 🚀'  # ok\n",
    "  leading spaces and trailing  \n\n\r\n",
    "\tTabs\tand\nnewlines\n\n\nnumbers 0123456789 3.14159 -42",
    "Unicode: naïve café Ωμέγα Привет мир こんにちは 😀👍🏽 \u200b zero-width",
    "{\"json\": [1, 2, {\"k\": null}], 'x': True}",
    " ",
    "",
)



def export(source: Path, out: Path, fmt: str, *, check_tokenizer: bool = True, log=sys.stderr) -> Path:
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}; valid: {', '.join(FORMATS)}")

    model_settings(Path(source))[0].apply()  # the run's kernels.* for any model code that runs here

    model_dir, tok_path = find_model(Path(source))
    out = Path(out)
    if out.resolve() == model_dir.resolve():
        raise ExportError(f"{out}: the output directory is the model's own directory")
    cfg_data = json.loads((model_dir / "config.json").read_text())
    if cfg_data.get("model_type") == "xlstm":  # re-exporting an HF export: import it first
        model = load_any(model_dir)
        cfg = model.config
    else:
        cfg = load_config(model_dir)
        model = None
    if fmt == "hf":
        to_hf_config(cfg)  # refuses unmappable models before anything is loaded or written

    tok = tk.load(tok_path)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "native":
        if model is None:  # a plain copy keeps the bytes (and dtype) exactly
            shutil.copyfile(model_dir / "model.safetensors", out / "model.safetensors")
            shutil.copyfile(model_dir / "config.json", out / "config.json")
        else:
            save_model(model, cfg, out)
        tok.save(out / TOKENIZER_FILE)
        print(f"exported {cfg.arch} model (native: safetensors + config.json + {TOKENIZER_FILE}) to {out}", file=log)
        return out

    if model is None:
        model = load_any(model_dir)
    save_hf(model, cfg, out, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    write_hf_tokenizer(tok, out)
    if check_tokenizer:
        check_hf_tokenizer(tok, out)
    print(f"exported xlstm_large model (transformers xLSTM + tokenizer) to {out}", file=log)
    return out


def write_hf_tokenizer(tok, out: Path) -> None:
    """tokenizer.model + tokenizer_config.json + special_tokens_map.json: transformers' LlamaTokenizer
    reads our SentencePiece model (identity normalisation, no dummy prefix, byte fallback). If
    transformers is installed, its converted fast tokenizer (tokenizer.json) is written too, so loading
    needs neither sentencepiece nor a conversion."""
    tok.save(out / TOKENIZER_FILE)
    specials = {"bos_token": tok.id_to_piece(tok.bos_id), "eos_token": tok.id_to_piece(tok.eos_id),
                "unk_token": tok.id_to_piece(tok.unk_id), "pad_token": tok.id_to_piece(tok.pad_id)}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "sp_model_kwargs": {},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return
    AutoTokenizer.from_pretrained(str(out)).save_pretrained(str(out))
    # save_pretrained rewrites tokenizer_config.json: keep our flags in it
    written = json.loads((out / "tokenizer_config.json").read_text())
    written.update({k: v for k, v in config.items() if k != "sp_model_kwargs"})
    (out / "tokenizer_config.json").write_text(json.dumps(written, indent=2) + "\n")


def check_hf_tokenizer(tok, out: Path, texts=CHECK_TEXTS) -> None:
    """Raise ExportError if the exported transformers tokenizer encodes or decodes any check text
    differently from our SentencePiece model. Skipped (with a note) without transformers."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        print("note: transformers not installed; the exported tokenizer was not checked", file=sys.stderr)
        return
    ht = AutoTokenizer.from_pretrained(str(out))
    for text in texts:
        ours = tok.encode(text)
        theirs = ht.encode(text, add_special_tokens=False)
        if theirs != ours:
            raise ExportError(f"exported tokenizer encodes {text!r} as {theirs[:16]}..., ours as {ours[:16]}...")
        if ht.decode(ours) != tok.decode(ours):
            raise ExportError(f"exported tokenizer decodes {text!r} differently: {ht.decode(ours)!r}")


def main(args) -> int:
    try:
        export(Path(args.source), Path(args.out), args.format, check_tokenizer=not args.no_check)
    except (ExportError, ValueError) as e:
        print(f"xlp export: error: {e}", file=sys.stderr)
        return 1
    return 0
