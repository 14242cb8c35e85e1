"""The bundled offline lm-eval tasks: cloze items made from held-out (val split) documents.

`build_items` decodes val documents and picks lines to predict (a line of 8 to 100 characters with a
word in it, not among the document's first two lines), one per document, then more per document
when the val split is small, each with up to `context_chars` characters of the document before it
as context (starting at a line start). One JSONL record per item:

    {"id", "doc", "context", "target", "word_context", "word", "choices", "label", "text"}

- `target`: the line (without its newline); the context ends with "\\n", so no delimiter is needed.
- `word_context`/`word`: LAMBADA-style, the line's last word (an identifier of 3+ characters, with the
  spaces before it) after the context and the rest of the line.
- `choices`/`label`: the target among 3 distractors, target lines of other items (multiple choice).
- `text`: context + target line, for rolling perplexity / bits per byte.

The task definitions are lm-eval YAML in configs/eval/ (xlp_cloze: loglikelihood of the last word ->
perplexity and greedy accuracy, as LAMBADA; xlp_cloze_mc: multiple choice -> acc, acc_norm; xlp_cloze_gen: generate_until "\\n"
-> exact_match; xlp_heldout: loglikelihood_rolling -> word/byte perplexity, bits per byte). Their
`dataset_kwargs.data_files` is a placeholder; `write_task_dir` writes copies reading this run's JSONL
(RUN_DIR/eval/lm_eval/tasks/, by absolute path, as lm-eval's loader reads a relative one from the
working directory), and `relocated_task_dir` points them at the JSONL beside them again when the run
directory was moved or copied (`python -m xlp.pipeline.eval.harness` does, for any run directory).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import yaml

from xlp.pipeline.eval.common import val_documents
from xlp.pipeline.core.schema.eval import local_task_files

DATA_FILE = "cloze.jsonl"
TASKS_DIR = "tasks"  # beside DATA_FILE: RUN_DIR/eval/lm_eval/{cloze.jsonl,tasks/}
TASK_HEADER = "# Written by the eval stage"
MIN_LINE, MAX_LINE = 8, 100
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")


MIN_GAP = 20  # lines between two items taken from the same document


def _candidates(lines: list[str]) -> list[int]:
    return [k for k in range(2, len(lines))
            if MIN_LINE <= len(lines[k].strip()) <= MAX_LINE and WORD.search(lines[k])
            and lines[k - 1].endswith("\n")]


def _item(lines: list[str], k: int, context_chars: int) -> dict:
    before = "".join(lines[:k])
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
    return {"context": context, "target": target, "word_context": word_context, "word": word,
            "text": context + target + "\n"}


def build_items(shard_dir: Path, tok, *, n_items: int, context_chars: int, seed: int = 0) -> list[dict]:
    """Up to n_items cloze items: one per val document in shard order, then (a small val split) more
    from the same documents, round-robin, at least MIN_GAP lines apart."""
    rng = np.random.default_rng([seed, 0xC10E])
    docs: list[tuple[list[str], list[int]]] = []
    for doc_ids in val_documents(shard_dir):
        if len(docs) >= n_items:
            break
        lines = tok.decode(doc_ids.tolist()).splitlines(keepends=True)
        good = _candidates(lines)
        if good:
            docs.append((lines, good))
    picked: list[list[int]] = [[] for _ in docs]
    items: list[dict] = []
    while len(items) < n_items:
        added = False
        for di, (lines, good) in enumerate(docs):
            if len(items) >= n_items:
                break
            left = [k for k in good if all(abs(k - p) >= MIN_GAP for p in picked[di])]
            if not left:
                continue
            k = int(left[rng.integers(len(left))])
            picked[di].append(k)
            items.append({"id": len(items), "doc": di, **_item(lines, k, context_chars)})
            added = True
        if not added:
            break
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
            f"{TASK_HEADER} from {src.name} in configs/eval/, with this run's data file.\n"
            + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        names.append(name)
    return names


def relocated_task_dir(task_dir: Path, into: Path) -> Path:
    """`task_dir` (as write_task_dir wrote it) when its task files read the data file beside it
    (task_dir/../cloze.jsonl); else a copy of it in `into` whose task files do: a run directory that
    was moved or copied (from a cluster, to another mount) keeps pointing at its own items."""
    data_file = (task_dir.parent / DATA_FILE).resolve()
    if not data_file.is_file():  # the task files alone (copied without their items): as they are
        return task_dir
    wrong = {}
    for path in sorted(task_dir.glob("*.yaml")):
        text = path.read_text()
        if not text.startswith(TASK_HEADER):
            continue  # a task file of the user's: theirs as it is
        data = yaml.safe_load(text)
        files = data.setdefault("dataset_kwargs", {}).get("data_files") or {}
        if files != {"test": str(data_file)}:
            data["dataset_kwargs"]["data_files"] = {"test": str(data_file)}
            wrong[path.name] = text.splitlines()[0] + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if not wrong:
        return task_dir
    shutil.copytree(task_dir, into)
    for name, text in wrong.items():
        (into / name).write_text(text)
    return into
