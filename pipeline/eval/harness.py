"""Our models in lm-evaluation-harness: an `lm_eval.api.model.LM` registered as `xlp`.

From the lm_eval command line (lm-eval discovers no models outside its own package, so this module
runs lm_eval's CLI after registering ours; every lm_eval option works as usual):

    HF_DATASETS_OFFLINE=1 python -m xlp.pipeline.eval.harness run --model xlp \\
        --model_args run_dir=$RUN_DIR --tasks xlp_cloze xlp_cloze_mc \\
        --limit 50 --output_path out/ --log_samples

Without --include_path, the tasks the eval stage wrote in RUN_DIR/eval/lm_eval/tasks are included
(`--include_path OTHER_RUN/eval/lm_eval/tasks`: another run's items); they read the items beside them
wherever the run directory is now (moved, copied from a cluster).

`run_dir=` loads RUN_DIR/train/model and the run's tokenizer (RUN_DIR/tokenizer/tokenizer.model or
tokenizer.json; or give `model_dir=` and `tokenizer=`, a tokenizer file or folder). The bundled offline
tasks are defined in configs/eval/*.yaml; the eval stage writes their data (built from the val split)
and a copy of the YAML pointing at it into RUN_DIR/eval/lm_eval/tasks/. From Python:
`XLPLM(model=model, tokenizer=tok)`.

How requests are scored (the training loop's document semantics, see xlp.pipeline.eval.common):
- loglikelihood(context, continuation): `context + continuation` is encoded as one text (the tokens
  the model reads it as) and cut after its last token lying wholly inside the context; the tokens after
  the cut are the continuation's (a token spanning the cut, such as ".__" of "events.__all__" under a
  byte-level BPE, is scored with the continuation, as lm-eval's own models do). Encoding the two apart
  would give tokens the text never has: GPT-2/NeoX's byte-level BPE ends a context's closing blank line
  with one "\n\n" token but reads "\n", "\n" before a following line. The row is `<eos> + context +
  continuation` with the state reset at the first context token, truncated on the left to `max_length`
  tokens of input; the result is the summed log-probability of the continuation's tokens and whether
  each is the argmax.
- loglikelihood_rolling(text): `<eos> + text` in windows of `max_length` predictions; every token is
  predicted once, each window with as much preceding context as fits (lm-eval's disjoint windows).
- generate_until(context, {until, max_gen_toks, ...}): the context is read with the recurrent
  state / KV cache, then greedy (or sampled, with do_sample) decode steps until a stop string,
  `<eos>` or max_gen_toks.
"""
from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
import yaml
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from xlp import tokenizer as tk
from xlp.pipeline.core.config import read_run_config
from xlp.pipeline.core.layout import RunLayout
from xlp.pipeline.eval.cloze import TASKS_DIR, relocated_task_dir
from xlp.pipeline.eval.common import load_tokenizer, pick_device
from xlp.pipeline.trained import model_settings
from xlp.xlstm_model import load_model, sample

log = logging.getLogger(__name__)


@register_model("xlp", "xlstm-pipeline")
class XLPLM(LM):
    def __init__(self, run_dir: Optional[str] = None, model_dir: Optional[str] = None,
                 tokenizer: Any = None, model: Any = None, device: Optional[str] = "auto",
                 batch_size: Any = 16, max_batch_size: Optional[int] = None, max_length: Optional[int] = None,
                 max_gen_toks: int = 64, **kwargs):
        super().__init__()
        if kwargs:
            log.warning("xlp model: ignoring unknown model_args %s", sorted(kwargs))
        dev = _resolve_device(device)
        if model is None:
            if model_dir is None:
                if run_dir is None:
                    raise ValueError("xlp model: give run_dir=RUN_DIR (or model_dir= and tokenizer=)")
                model_dir = str(RunLayout(run_dir).train.model_dir)
            model = load_model(model_dir, map_location="cpu")
            if run_dir is not None:  # the run's kernels.* (the eval stage, passing model=, has set them)

                model_settings(Path(run_dir))[0].apply()
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            if tokenizer is None:
                if run_dir is None:
                    raise ValueError("xlp model: give tokenizer=PATH/tokenizer.model or tokenizer.json (or run_dir=)")
                tokenizer = load_tokenizer(Path(run_dir))
            else:
                tokenizer = tk.load(tokenizer)
        self.model = model.to(dev).eval()
        self.tok = tokenizer
        self._device = dev
        try:
            self.batch_size = max(1, int(batch_size))
        except (TypeError, ValueError):  # "auto": no search, a fixed size
            self.batch_size = 16
        if max_batch_size:
            self.batch_size = min(self.batch_size, int(max_batch_size))
        if max_length is None and run_dir is not None:
            max_length = _run_seq_len(Path(run_dir))
        self.max_length = int(max_length or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.eos = int(self.tok.eos_id)
        self.pad = int(self.tok.pad_id)

    # ----------------------------------------------------------------------------- scoring core
    def _score_rows(self, rows: list[tuple[list[int], int, bool]]) -> list[tuple[float, bool]]:
        """rows: (tokens, n_scored, reset_at_1). Input tokens[:-1] predict tokens[1:]; the last
        n_scored predictions are summed. reset_at_1: tokens[0] is the <eos> before a document
        (the state resets at tokens[1]). Returns (sum of log-probs, all greedy) per row."""
        out: list[Optional[tuple[float, bool]]] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            S = max(len(rows[i][0]) for i in idx) - 1
            x = torch.full((len(idx), S), self.pad, dtype=torch.long)
            d = torch.zeros((len(idx), S), dtype=torch.bool)
            d[:, 0] = True
            for b, i in enumerate(idx):
                toks, _, reset = rows[i]
                x[b, :len(toks) - 1] = torch.tensor(toks[:-1])
                if reset and len(toks) > 2:
                    d[b, 1] = True
            with torch.no_grad():
                hidden = self.model.hidden_states(x.to(self._device), d.to(self._device))
                for b, i in enumerate(idx):
                    toks, n, _ = rows[i]
                    T = len(toks) - 1
                    tgt = torch.tensor(toks[T - n + 1:], device=self._device)
                    lp = F.log_softmax(self.model.logits(hidden[b, T - n:T]).float(), dim=-1)
                    ll = float(lp.gather(-1, tgt[:, None]).sum())
                    greedy = bool((lp.argmax(-1) == tgt).all())
                    out[i] = (ll, greedy)
        return out  # type: ignore[return-value]

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text)) if text else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens): the encoding of `context + continuation` cut after its last
        token whose text lies wholly inside `context` (see the module docstring)."""
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        if whole[:len(ctx)] == ctx:
            return ctx, whole[len(ctx):]
        j = 0
        while j < min(len(ctx), len(whole)) and whole[j] == ctx[j]:
            j += 1
        while j < len(whole) - 1 and context.startswith(self.tok.decode(whole[:j + 1])):
            j += 1
        return whole[:j], whole[j:]

    # ---------------------------------------------------------------------------- lm-eval API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            if not continuation:
                raise ValueError(f"empty continuation for context {context[-40:]!r}")
            ctx, cont = self.encode_pair(context, continuation)
            full = [self.eos] + ctx + cont
            keep = self.max_length + 1
            reset = len(full) <= keep
            if not reset:
                full = full[-keep:]
            rows.append((full, min(len(cont), len(full) - 1), reset))
        res = self._score_rows(rows)
        for req, r in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return res

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], int, bool]]:
        """Disjoint windows of `max_length` predictions over `<eos> + tokens`, each with as much
        earlier context as fits (see the module docstring)."""
        s = [self.eos] + tokens
        n, L = len(tokens), self.max_length
        rows = [(s[:min(L, n) + 1], min(L, n), True)]
        a = L + 1
        while a <= n:
            b = min(a + L, n + 1)
            rows.append((s[b - 1 - L:b], b - a, False))
            a = b
        return rows

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, owner = [], []
        for r, req in enumerate(requests):
            toks = self._encode(req.args[0])
            if not toks:
                toks = [self.eos]
            for w in self.rolling_windows(toks):
                rows.append(w)
                owner.append(r)
        scores = self._score_rows(rows)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, scores):
            totals[r] += ll
        for req, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, t)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        gen = torch.Generator(device=self._device).manual_seed(1234)
        for req in requests:
            context, kw = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            temperature = temperature if do_sample else 0.0
            top_k, top_p = kw.pop("top_k", None), kw.pop("top_p", None)
            ctx = self._encode(context) or [self.eos]
            ctx = ctx[-self.max_length:]
            ids = torch.tensor([ctx], device=self._device)
            tokens: list[int] = []
            text = ""
            with torch.no_grad():
                logits, state = self.model.forward_with_state(ids)
                logits = logits[:, -1]
                for _ in range(max_new):
                    t = sample(logits.float(), temperature, top_k, top_p, gen if temperature > 0 else None)
                    tid = int(t[0])
                    if tid == self.eos:
                        break
                    tokens.append(tid)
                    text = self.tok.decode(tokens)
                    if any(u and u in text for u in until):
                        break
                    logits, state = self.model.step(t, state)
            for u in until:
                if u and u in text:
                    text = text[:text.index(u)]
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    @property
    def eot_token_id(self) -> int:
        return self.eos

    @property
    def tokenizer_name(self) -> str:
        return f"xlp-{self.tok.kind}-{self.tok.sha256[:12]}"


def _resolve_device(device: Any) -> torch.device:
    """auto/None: cuda when there is a GPU, else cpu. lm_eval's CLI passes cuda:0 by default: on a
    machine without a GPU that falls back to cpu with a warning."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return pick_device("auto")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("xlp model: device %s asked for but torch sees no GPU; using cpu", device)
        return torch.device("cpu")
    return torch.device(str(device))


def _run_seq_len(run_dir: Path) -> Optional[int]:
    """data.seq_len of the run (its config.yaml), the context the model was trained on."""
    path = RunLayout(run_dir).config
    if not path.is_file():
        return None
    text = read_run_config(path)  # a damaged config.yaml is an error naming it, not a default context
    try:
        return int(yaml.safe_load(text)["data"]["seq_len"])
    except (KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


BINARY_METRICS = ("acc", "acc_norm", "exact_match")


def flatten_results(results: dict) -> dict:
    """{task: {metric: value}} from simple_evaluate's output (`acc,none` -> `acc`), with `n` (the
    documents scored) and the binomial standard error `<metric>_stderr` of 0/1 metrics (run_tasks
    turns lm-eval's bootstrap off: it forks a process pool, slow inside a stage)."""
    out: dict = {}
    for task, metrics in (results.get("results") or {}).items():
        row = {}
        n = None
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name == "sample_len" or key == "sample_len":
                n = value
                continue
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            row[name if filt in ("none", "") else f"{name}[{filt}]"] = float(value)
        n = n or (results.get("n-samples", {}).get(task) or {}).get("effective")
        if n:
            row["n"] = int(n)
            for name in BINARY_METRICS:
                if name in row and f"{name}_stderr" not in row and n > 1:
                    p = row[name]
                    row[f"{name}_stderr"] = (p * (1 - p) / (n - 1)) ** 0.5
        out[task] = row
    return out


def run_tasks(lm: LM, tasks: list[str], *, include_path: Optional[Path], limit: Optional[int],
              log_samples: bool = False, offline: bool = True) -> dict:
    """simple_evaluate on `tasks` with our tasks directory; offline: no built-in (hub) tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=not offline)
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit or None,
                           log_samples=log_samples, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                           torch_random_seed=0, fewshot_random_seed=0)


def main(argv: Optional[list[str]] = None) -> None:
    """lm_eval's own command line, with the `xlp` model registered and the run's tasks found: without
    --include_path, `--model_args run_dir=RUN_DIR` includes RUN_DIR/eval/lm_eval/tasks; a tasks directory
    the eval stage wrote reads the items beside it wherever the run directory is now."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="xlp-lm-eval-") as tmp:
        sys.argv = [sys.argv[0]] + with_run_tasks(args, Path(tmp) / TASKS_DIR)
        cli_evaluate()


def with_run_tasks(args: list[str], scratch: Path) -> list[str]:
    """lm_eval command-line `args` with --include_path set as `main` says (a relocated copy goes to
    `scratch`)."""
    include, at = None, None
    for i, a in enumerate(args):
        if a == "--include_path" and i + 1 < len(args):
            include, at = args[i + 1], i
        elif a.startswith("--include_path="):
            include, at = a.partition("=")[2], i
    if include is None:
        run_dir = _model_arg(args, "run_dir")
        if run_dir is None:
            return args
        tasks = RunLayout(Path(run_dir)).lm_eval_dir / TASKS_DIR
        if not tasks.is_dir():
            print(f"xlp: no {tasks} (the eval stage writes it when eval.parts has lm_eval): only lm-eval's own "
                  "tasks are available; give --include_path DIR for tasks of your own", file=sys.stderr)
            return args
        return args + ["--include_path", str(relocated_task_dir(tasks, scratch))]
    found = relocated_task_dir(Path(include), scratch) if Path(include).is_dir() else Path(include)
    if str(found) == include:
        return args
    args = [a for j, a in enumerate(args) if j != at and not (j == at + 1 and args[at] == "--include_path")]
    return args + ["--include_path", str(found)]


def _model_arg(args: list[str], key: str) -> Optional[str]:
    """The value of `key` in --model_args / -a (`k=v,k2=v2` or `k=v k2=v2`), or None."""
    value = None
    for i, a in enumerate(args):
        if a not in ("--model_args", "-a") and not a.startswith("--model_args="):
            continue
        items = [a.partition("=")[2]] if a.startswith("--model_args=") else []
        for b in args[i + 1:]:
            if b.startswith("-"):
                break
            items.append(b)
        for item in ",".join(items).split(","):
            k, eq, v = item.partition("=")
            if eq and k.strip() == key:
                value = v.strip()
    return value


if __name__ == "__main__":
    main()
