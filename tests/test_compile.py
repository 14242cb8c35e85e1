"""train.compile: compiled blocks, the fused AdamW step and the activation checkpointing policies
give the training of eager PyTorch (CPU).

The compiled runs use torch.compile's `aot_eager` backend: the same Dynamo trace, fake-tensor
propagation through our custom ops, AOTAutograd joint graph and checkpoint partitioning as
`inductor`, then PyTorch's own kernels instead of generated C++ (inductor needs a C++ compiler and
~1.5 minutes per compile on this 2-core machine; the GPU campaign runs inductor).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from xlp.pipeline.core.schema.train import TrainConfig
from xlp.pipeline.train.optim import build_optimizer
from xlp.xlstm_model import ModelConfig, build_model
from xlp.xlstm_model.config import load_model_yaml

REPO = Path(__file__).resolve().parents[1]


def tiny(arch: str, **kw) -> ModelConfig:
    return ModelConfig(arch=arch, vocab_size=64, d_model=32, num_blocks=2, num_heads=2, tie_weights=True, **kw)


def batches(n: int, B: int = 2, S: int = 24, vocab: int = 64):
    """Every other batch packs a second document into row 1 (doc_starts); the others have none
    (doc_starts None: another compiled graph)."""
    g = torch.Generator().manual_seed(1)
    for step in range(n):
        ids = torch.randint(0, vocab, (B, S + 1), generator=g)
        starts = torch.zeros(B, S, dtype=torch.bool)
        starts[1, S // 3] = True
        yield ids[:, :-1], (starts if step % 2 == 0 else None), ids[:, 1:]


def train_losses(model, *, fused: bool, steps: int = 4, seq_len: int = 24) -> list[float]:
    """AdamW steps as the train stage takes them (xlp.pipeline.train.optim's groups, grad clipping)."""
    tc = TrainConfig(lr=3e-3)
    opt = build_optimizer(model, tc, fused=fused)
    assert opt.defaults["fused"] is (True if fused else None)
    out = []
    for ids, starts, targets in batches(steps, S=seq_len):
        loss = model(ids, doc_starts=starts, targets=targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


@pytest.mark.parametrize("arch", ["xlstm_large", "llama"])
def test_compiled_training_matches_eager(arch):
    """Four steps: eager blocks + per-tensor AdamW against compiled blocks (selective checkpointing
    inside the graph) + fused AdamW, from the same weights: same losses and weights to rounding."""
    torch.manual_seed(0)
    eager = build_model(tiny(arch))
    compiled = copy.deepcopy(eager)
    compiled.config.activation_checkpointing, compiled.config.checkpoint_policy = True, "selective"
    compiled.compile_blocks(backend="aot_eager")
    assert compiled.blocks_compiled and not eager.blocks_compiled
    counters.clear()
    # compiling renames nothing: checkpoints and exports see the same state dict
    assert list(compiled.state_dict()) == list(eager.state_dict())
    ref, got = train_losses(eager, fused=False), train_losses(compiled, fused=True)
    assert not counters["graph_break"]  # each block is one graph (per doc_starts case)
    assert counters["stats"]["unique_graphs"] == 2  # with and without doc_starts: every block shares them
    assert ref[-1] < ref[0]
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name


TRITON_SCRIPT = """
import json, copy, torch
from xlp import kernels
from torch._dynamo.utils import counters
from test_compile import tiny, train_losses
torch.manual_seed(0)
from xlp.xlstm_model import build_model
eager = build_model(tiny("xlstm_large", mlstm_chunk_size=16))
compiled, oracle = copy.deepcopy(eager), copy.deepcopy(eager)
compiled.config.activation_checkpointing, compiled.config.checkpoint_policy = True, "selective"
compiled.compile_blocks(backend="aot_eager")
# S = 32, two whole chunks: no padding, so the kernels' outputs reach the graph as the custom ops return them
with kernels.use_backend("triton"):  # compiled first: no Triton function is loaded yet when Dynamo traces
    out = {"compiled": train_losses(compiled, fused=True, steps=2, seq_len=32),
           "eager": train_losses(eager, fused=False, steps=2, seq_len=32)}
out["graph_breaks"] = sum(counters["graph_break"].values())
with kernels.use_backend("reference"):
    out["reference"] = train_losses(oracle, fused=False, steps=2, seq_len=32)
print("LOSSES", json.dumps(out))
"""


@pytest.mark.slow  # Dynamo tracing the Triton kernels under the interpreter: a minute
def test_compiled_training_with_triton_kernels_matches_eager():
    """The same with the Triton ops (mLSTM, norms, fused linear + cross-entropy) run by Triton's
    interpreter: the compiled graph calls them as custom ops, planned from their fake implementations
    (whose output strides must be the real ones: the graph views the outputs as the fakes say), with
    no graph break."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("LOSSES", 1)[1])
    assert out["graph_breaks"] == 0
    assert out["compiled"] == pytest.approx(out["eager"], rel=1e-5)
    assert out["eager"] == pytest.approx(out["reference"], rel=1e-4)  # Triton fp32 vs the oracle


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["xlstm_large", "llama"])
def test_checkpoint_policies_recompute_what_they_say(arch):
    """Ops run during backward: `full` reruns the blocks' matmuls, `selective` reruns none of them
    (it kept their outputs) but does rerun elementwise ops; every policy gives the same gradients."""
    torch.manual_seed(0)
    model = build_model(tiny(arch))
    (ids, starts, targets), = batches(1)
    grads, backward_ops = {}, {}
    for policy in ("none", "full", "selective"):
        model.config.activation_checkpointing = policy != "none"
        model.config.checkpoint_policy = "full" if policy == "none" else policy
        model.zero_grad()
        loss = model(ids, doc_starts=starts, targets=targets)
        with OpCounter() as counter:
            loss.backward()
        grads[policy] = [p.grad.clone() for p in model.parameters()]
        backward_ops[policy] = counter.counts
    matmuls = lambda counts: sum(counts.get(op, 0) for op in ("aten::mm", "aten::addmm", "aten::bmm"))
    elementwise = lambda counts: sum(counts.get(op, 0) for op in ("aten::mul.Tensor", "aten::add.Tensor", "aten::silu"))
    assert matmuls(backward_ops["full"]) > matmuls(backward_ops["none"])
    assert matmuls(backward_ops["selective"]) == matmuls(backward_ops["none"])
    assert elementwise(backward_ops["selective"]) > elementwise(backward_ops["none"])
    for policy in ("full", "selective"):
        for a, b in zip(grads["none"], grads[policy]):
            assert torch.equal(a, b), policy


def test_compile_keys_are_validated():
    TrainConfig(compile=True, zero_stage=2).validate()
    with pytest.raises(ValueError, match=r"train.compile_backend.*valid values: inductor, aot_eager, eager"):
        TrainConfig(compile=True, compile_backend="tvm").validate()
    with pytest.raises(ValueError, match=r"train.compile.*zero_stage <= 2"):
        TrainConfig(compile=True, zero_stage=3).validate()
    with pytest.raises(ValueError, match=r"model.checkpoint_policy: must be one of full, selective"):
        tiny("llama", checkpoint_policy="some").validate()


def test_model_yaml_reads_as_omegaconf_does():
    """The benchmarks read configs/model/*.yaml without OmegaConf (the GPU machine has none)."""
    from omegaconf import OmegaConf

    for path in sorted((REPO / "configs" / "model").glob("*.yaml")):
        expected = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))
        assert load_model_yaml(path) == expected, path.name
    cfg = load_model_yaml("tiny", ["vocab_size=512", "model.slstm_at=[0,2]", "tie_weights=false"])
    assert (cfg.vocab_size, cfg.slstm_at, cfg.tie_weights) == (512, [0, 2], False)
    with pytest.raises(ValueError, match="model.d_modl: unknown key; valid: arch, vocab_size, d_model"):
        load_model_yaml("tiny", ["d_modl=3"])
    with pytest.raises(ValueError, match="model.num_blocks: 'many' is not a valid int"):
        load_model_yaml("tiny", ["num_blocks=many"])


@pytest.mark.slow  # two train stages of DeepSpeed ranks
def test_train_stage_with_compile_follows_eager(tmp_path):
    """The train stage's ranks (DeepSpeed ZeRO-1, one gloo rank) with train.compile=true: the same
    losses as without, and the blocks did run through torch.compile (its checkpointing note is in
    the rank's log: the selective policy was traced by Dynamo)."""
    from test_train import losses, make_shards, train

    shards = make_shards(tmp_path / "shard")
    common = ["model.arch=xlstm_large", "train.zero_stage=1", "train.steps=4", "train.eval_every=0",
              "train.eval_batches=1", "train.save_every=0"]
    train(tmp_path / "eager", shards, common, procs=1)
    result = train(tmp_path / "compiled", shards, [*common, "train.compile=true", "train.compile_backend=aot_eager",
                                                   "model.activation_checkpointing=true",
                                                   "model.checkpoint_policy=selective"], procs=1)
    # issue 32: compiled blocks record the backend each op ran with (at their trace), as eager ones do
    assert result["kernel_backends"] == {"cpu": {op: ["reference"] for op in (
        "layer_norm", "linear_cross_entropy", "mlstm_chunkwise", "rms_norm")}}
    ref, got = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4] and ref[4] < ref[1]
    assert [got[s] for s in ref] == pytest.approx([ref[s] for s in ref], rel=1e-5)
    log = (tmp_path / "compiled" / "train" / "logs" / "rank_0.log").read_text()
    assert "context_fn is passed to torch.utils.checkpoint under torch.compile" in log
    assert "under torch.compile" not in (tmp_path / "eager" / "train" / "logs" / "rank_0.log").read_text()
