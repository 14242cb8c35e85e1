"""The bundled offline lm-eval tasks: cloze items made from held-out (val split) documents.

`build_items` decodes val documents and, from each, picks one line to predict (a line of 8 to 100
characters, not blank, not the document's first lines), with up to `context_chars` characters of
the document before it as context (starting at a line start). One JSONL record per item:

    {"id", "context", "target", "word_context", "word", "choices", "label", "text"}

- `target`: the line (without its newline); the context ends with "\\n", so no delimiter is needed.
- `word_context`/`word`: LAMBADA-style, the line's last word (an identifier of 3+ characters, with the
  spaces before it) after the context and the rest of the line.
- `choices`/`label`: the target among 3 distractors, target lines of other items (multiple choice).
- `text`: the document's opening (up to 2 x context_chars, cut at a line end), for rolling
  perplexity / bits per byte.

The task definitions are lm-eval YAML in configs/eval/ (xlp_cloze: loglikelihood of the last word ->
perplexity and greedy accuracy, as LAMBADA; xlp_cloze_mc: multiple choice -> acc, acc_norm; xlp_cloze_gen: generate_until "\\n"
-> exact_match; xlp_heldout: loglikelihood_rolling -> word/byte perplexity, bits per byte). Their
`dataset_kwargs.data_files` point at runs/demo; `write_task_dir` writes copies pointing at this
run's JSONL, which is what the stage (and `--include_path RUN_DIR/eval/lm_eval/tasks`) uses.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import yaml

from pipeline.eval.common import val_documents
from pipeline.eval.config import local_task_files

DATA_FILE = "cloze.jsonl"
MIN_LINE, MAX_LINE = 8, 100
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")


def _pick_line(lines: list[str], rng: np.random.Generator) -> int | None:
    good = [k for k in range(2, len(lines))
            if MIN_LINE <= len(lines[k].strip()) <= MAX_LINE and WORD.search(lines[k])]
    if not good:
        return None
    return int(good[rng.integers(len(good))])


def build_items(shard_dir: Path, tok, *, n_docs: int, context_chars: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng([seed, 0xC10E])
    items = []
    for doc_ids in val_documents(shard_dir):
        if len(items) >= n_docs:
            break
        text = tok.decode(doc_ids.tolist())
        lines = text.splitlines(keepends=True)
        k = _pick_line(lines, rng)
        if k is None:
            continue
        before = "".join(lines[:k])
        if not before.endswith("\n"):
            continue
        context = before[-context_chars:]
        if len(before) > context_chars:  # start at a line start
            cut = context.find("\n")
            context = context[cut + 1:] if 0 <= cut < len(context) - 1 else context
        target = lines[k].rstrip("\n")
        # LAMBADA-style: the line's last word, after the rest of the line; whitespace before the word
        # goes with the word (as SentencePiece joins a space to the word after it)
        m = list(WORD.finditer(target))[-1]
        head = target[:m.start()]
        word_context = context + head.rstrip(" \t")
        word = head[len(head.rstrip(" \t")):] + m.group(0)
        opening = text[:2 * context_chars]
        if len(text) > 2 * context_chars and "\n" in opening:
            opening = opening[:opening.rindex("\n") + 1]
        items.append({"id": len(items), "context": context, "target": target, "word_context": word_context,
                      "word": word, "text": opening})
    # distractors: target lines of other items, different from this target
    targets = [it["target"] for it in items]
    for i, it in enumerate(items):
        others = [t for j, t in enumerate(targets) if j != i and t.strip() != it["target"].strip()]
        picks = [others[j] for j in rng.choice(len(others), size=min(3, len(others)), replace=False)] if others else []
        choices = picks + [it["target"]]
        order = rng.permutation(len(choices))
        it["choices"] = [choices[j] for j in order]
        it["label"] = int(np.nonzero(order == len(choices) - 1)[0][0])
    return items


def write_items(items: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    tmp.replace(path)
    return path


def write_task_dir(task_dir: Path, data_file: Path) -> list[str]:
    """Copies of the bundled task YAMLs in `task_dir`, reading `data_file`; returns the task names."""
    task_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for name, src in local_task_files().items():
        data = yaml.safe_load(src.read_text())
        data.setdefault("dataset_kwargs", {})["data_files"] = {"test": str(Path(data_file).resolve())}
        (task_dir / src.name).write_text(
            f"# Written by the eval stage from {src.name} in configs/eval/, with this run's data file.\n"
            + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        names.append(name)
    return names
