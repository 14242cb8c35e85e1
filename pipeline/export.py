"""`xlp export`: take a trained model out of the pipeline.

  --format native   our safetensors + config.json + the run's tokenizer (tokenizer.model, or
                    tokenizer.json for a Hugging Face one) (every arch; `xlp generate` and
                    `model.init_from=native:DIR` read it)
  --format hf       transformers' xLSTM (arch xlstm_large only): config.json (model_type xlstm) +
                    model.safetensors with its weight names + a transformers tokenizer (built from our
                    SentencePiece model, or the run's tokenizer.json as a PreTrainedTokenizerFast), so
                    AutoModelForCausalLM / AutoTokenizer.from_pretrained(OUT) load it without this package.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, TextIO

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



def export(source: Path, out: Path, fmt: str, *, check_tokenizer: bool = True, force: bool = False,
           log: Optional[TextIO] = None) -> Path:
    """Write `source`'s model to `out`, which must not exist or be empty; `force`: an earlier export
    there is moved aside (to OUT.replaced-<time>), never deleted. The export is written beside `out` and
    renamed to it when whole, so a failed or killed export never looks like one. `log`: where the
    one-line report goes (sys.stderr as it is when called, not as it was at import)."""
    log = log or sys.stderr
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}; valid: {', '.join(FORMATS)}")
    out = Path(out)
    _check_out(out, force)

    model_settings(Path(source))[0].apply()  # the run's kernels.* for any model code that runs here

    model_dir, tok_path = find_model(Path(source))
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
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if fmt == "native":
            if model is None:  # a plain copy keeps the bytes (and dtype) exactly
                shutil.copyfile(model_dir / "model.safetensors", partial / "model.safetensors")
                shutil.copyfile(model_dir / "config.json", partial / "config.json")
            else:
                save_model(model, cfg, partial)
            saved = tok.save_to(partial)
            what = f"{cfg.arch} model (native: safetensors + config.json + {saved.name})"
        else:
            if model is None:
                model = load_any(model_dir)
            save_hf(model, cfg, partial, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
            write_hf_tokenizer(tok, partial)
            if check_tokenizer:
                check_hf_tokenizer(tok, partial)
            what = "xlstm_large model (transformers xLSTM + tokenizer)"
        partial.chmod(0o755)  # mkdtemp's 0700 would keep the export from the user's group
        kept = _set_aside(out, force)
        os.replace(partial, out)  # onto a missing or empty directory
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # an unfinished export of ours, nothing else
        raise
    if kept is not None:
        print(f"the previous export in {out} is kept in {kept} (--force; delete it when it is no longer needed)",
              file=log)
    print(f"exported {what} to {out}", file=log)
    return out


def _check_out(out: Path, force: bool) -> None:
    """Refuse an output path that holds something, before any work: an earlier export is replaced only
    with --force (and kept aside then); anything else is never replaced."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ExportError(f"{out} exists and is not a directory: give another output path")
    held = sorted(p.name for p in out.iterdir())
    if not held:
        return
    listed = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
    if not (out / "config.json").is_file():
        raise ExportError(f"{out} exists and holds files that are not an export ({listed}): nothing was "
                          "written; give another output path")
    if not force:
        raise ExportError(f"{out} already holds an export ({listed}): nothing was written; give another "
                          "output path, or add --force to replace it (the previous export is then kept in "
                          f"{out.name}.replaced-<time> beside it)")


def _set_aside(out: Path, force: bool) -> Path | None:
    """Move an earlier export at `out` to OUT.replaced-<time> (checked again: it may have appeared while
    this export ran). Returns where it went; None when `out` is missing or empty."""
    _check_out(out, force)
    if not out.exists() or not any(out.iterdir()):
        return None
    kept = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while kept.exists():
        n += 1
        kept = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}.{n}")
    os.replace(out, kept)
    return kept


def write_hf_tokenizer(tok, out: Path) -> None:
    """The run's tokenizer as transformers loads it (AutoTokenizer.from_pretrained(out)): a Hugging Face
    tokenizer as itself (write_fast_tokenizer), a SentencePiece model as a LlamaTokenizer (below)."""
    if tok.kind == "hf":
        write_fast_tokenizer(tok, out)
    else:
        write_llama_tokenizer(tok, out)


def write_fast_tokenizer(tok, out: Path) -> None:
    """tokenizer.json (its bytes unchanged) + tokenizer_config.json + special_tokens_map.json naming its
    special tokens: transformers' PreTrainedTokenizerFast, adding no bos/eos when encoding (as ours)."""
    tok.save_to(out)  # tokenizer.json (and our roles file, rewritten just below)
    roles = tok.roles
    specials = {f"{role}_token": text for role, text in roles.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def write_llama_tokenizer(tok, out: Path) -> None:
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
    differently from the run's tokenizer. Skipped (with a note) without transformers."""
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
        export(Path(args.source), Path(args.out), args.format, check_tokenizer=not args.no_check,
               force=args.force)
    except (ExportError, ValueError) as e:
        print(f"xlp export: error: {e}", file=sys.stderr)
        return 1
    return 0
