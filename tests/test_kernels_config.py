"""Issue 15: the kernels' settings are config keys (`kernels.*`, kernels/config.py) that every process
running a model applies; the environment does not change a pipeline run.

The eval stage runs here with kernels.backend=triton under Triton's interpreter, in a subprocess
(TRITON_INTERPRET must be set before Triton is first imported), with every Triton op wrapped in a
call counter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xlp.kernels.config import MLSTM_LAUNCH, KernelsConfig, check_mlstm_launch, format_mlstm_launch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

EVAL_SCRIPT = r"""
import collections, importlib, json, os, sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from xlp.kernels.dispatch import TRITON_MODULES

calls = collections.Counter()
for op, module in TRITON_MODULES.items():  # before the first dispatch: resolve picks up the wrappers
    mod = importlib.import_module(f"xlp.kernels.triton.{module}")
    def counted(*args, _fn=getattr(mod, op), _op=op, **kwargs):
        calls[_op] += 1
        return _fn(*args, **kwargs)
    setattr(mod, op, counted)

from test_eval import make_run, stage_ctx
from xlp.pipeline.stages.eval import run

run_dir = make_run(Path(sys.argv[1]), train_steps=2, extra=["model.slstm_at=[]", "model.num_blocks=1"])
small = ["eval.parts=[ppl,generation]", "eval.baseline=false", "eval.ppl_batches=1", "eval.batch_size=2",
         "eval.gen_contexts=[8]", "eval.gen_tokens=2", "eval.plots=false"]
out = {}
# the environment says the opposite of the config each time: the config must win
for backend, env in (("triton", "reference"), ("auto", "triton")):
    os.environ["XLP_KERNEL_BACKEND"] = env
    calls.clear()
    metrics = run(stage_ctx(run_dir, [*small, f"kernels.backend={backend}"]))
    out[backend] = {"calls": dict(calls), "val_loss": metrics["val_loss"], "kernel_backends": metrics["kernel_backends"]}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # the eval stage under the Triton interpreter: a minute
def test_eval_stage_runs_the_triton_kernels_when_configured(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(TESTS),
               OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", EVAL_SCRIPT, str(tmp_path / "run")], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    triton, auto = out["triton"], out["auto"]
    # kernels.backend=triton (XLP_KERNEL_BACKEND=reference in the environment): the model's forward
    # (chunkwise mLSTM, norms) and the generation measurement's steps ran through the Triton kernels
    assert triton["calls"].get("mlstm_chunkwise", 0) > 0 and triton["calls"].get("mlstm_step", 0) > 0, triton
    assert triton["calls"].get("layer_norm", 0) + triton["calls"].get("rms_norm", 0) > 0, triton
    # kernels.backend=auto on CPU tensors (XLP_KERNEL_BACKEND=triton in the environment): none did
    assert sum(auto["calls"].values()) == 0, auto
    assert abs(triton["val_loss"] - auto["val_loss"]) < 1e-3 * abs(auto["val_loss"]), out
    # the stage's metrics say which backend each op ran with (issue 32: a GPU run's fallback shows there)
    assert triton["kernel_backends"] == {"cpu": {op: ["triton"] for op in triton["calls"]}}, triton
    assert set(auto["kernel_backends"]) == {"cpu"} and {"mlstm_chunkwise", "mlstm_step"} <= set(auto["kernel_backends"]["cpu"])
    assert all(used == ["reference"] for used in auto["kernel_backends"]["cpu"].values()), auto


def test_kernels_config_validates_and_formats():
    KernelsConfig(backend="triton", mlstm={"bc_w": 4, "chunk": 32}).validate()
    for cfg, words in ((KernelsConfig(backend="cuda"), "`kernels.backend` is 'cuda'; valid values: auto, reference, triton"),
                       (KernelsConfig(mlstm={"bc_x": 4}), "kernels.mlstm: unknown key 'bc_x'; valid: fs_bk, fs_bv"),
                       (KernelsConfig(mlstm={"fo_w": 3}), "kernels.mlstm.fo_w is 3; expected a power of two"),
                       (KernelsConfig(mlstm={"chunk": 24}), "kernels.mlstm.chunk is 24; expected 0 (automatic)"),
                       (KernelsConfig(mlstm={"bs_s": 0}), "kernels.mlstm.bs_s is 0; expected at least 1")):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            cfg.validate()
    assert check_mlstm_launch({"bc_w": 4}) == {"bc_w": 4}
    assert format_mlstm_launch({**MLSTM_LAUNCH, "bc_w": 4, "fs_s": 2}) == "kernels.mlstm.fs_s=2 kernels.mlstm.bc_w=4"
    assert format_mlstm_launch(MLSTM_LAUNCH) == "kernels.mlstm={}"


def test_apply_sets_the_process_defaults_over_the_environment(monkeypatch):
    from xlp import kernels
    from xlp.kernels import config as kconfig
    from xlp.kernels.config import mlstm_launch

    saved = kconfig._default_override, dict(mlstm_launch)
    try:
        monkeypatch.setenv("XLP_KERNEL_BACKEND", "triton")
        KernelsConfig().apply()  # "auto" is set explicitly: the environment no longer decides
        assert kernels.default_backend() == "auto"
        KernelsConfig(backend="reference", mlstm={"bc_w": 4}).apply()
        assert kernels.default_backend() == "reference" and mlstm_launch == {**MLSTM_LAUNCH, "bc_w": 4}
        KernelsConfig().apply()
        assert mlstm_launch == MLSTM_LAUNCH
        kernels.set_default_backend(None)  # code that calls the kernels directly: the environment's default
        assert kernels.default_backend() == "triton"
    finally:
        kernels.set_default_backend(saved[0])
        mlstm_launch.clear()
        mlstm_launch.update(saved[1])


def test_dispatch_records_the_backend_each_op_ran_with():
    """Issue 32: a GPU run that silently computed with the reference ops shows in the record the train and
    eval stages put in their metrics (kernel_backends). Eager calls record each time; a compiled graph
    records once, at its trace, and the record is no guard: a graph is not recompiled when it changes."""
    import torch

    from xlp import kernels
    from xlp.kernels.dispatch import reset_used_backends, used_backends

    x, w = torch.randn(2, 16), torch.rand(16) + 0.5
    reset_used_backends()
    kernels.rms_norm(x, w)  # auto on CPU tensors: the reference
    with kernels.use_backend("triton"):  # forced (the Triton interpreter runs it on this CPU)
        kernels.rms_norm(x, w)
    assert used_backends() == {"cpu": {"rms_norm": ["reference", "triton"]}}

    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda t: kernels.layer_norm(t, w, None), backend=count_graphs, fullgraph=True)
    reset_used_backends()
    f(x)
    assert used_backends() == {"cpu": {"layer_norm": ["reference"]}}
    reset_used_backends()
    f(x)
    assert used_backends() == {} and len(graphs) == 1
