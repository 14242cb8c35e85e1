"""The project as a user gets it from a wheel: built, installed (not editable, with the hf and eval
extras) into a new virtual environment, and run from an empty folder that has no source tree in it.

Everything a run needs ships inside the package (configs, eval task files, the sbatch template), our
import names live under `xlp.` and leave `kernels`, `pipeline` and `tokenizer` to their owners, and
transformers' own xLSTM loads our export in a process that imported our model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk (Makefile's TORCH_PIP_ARGS)

pytestmark = pytest.mark.slow


def sh(cmd: list, *, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, REPO], cwd=root)
    (wheel,) = dist.glob("xlstm_pipeline-*.whl")
    venv = root / "venv"
    sh([sys.executable, "-m", "venv", venv], cwd=root)
    py = venv / "bin" / "python"
    # torch first, on its own (as the Makefile does): the CPU build, never a CUDA one
    # --no-compile: Python compiles what the run imports when it imports it, not every file of torch,
    # transformers and Ray up front (a minute of the install on two cores)
    sh([py, "-m", "pip", "install", "-q", "--no-compile", TORCH], cwd=root)
    # the wheel and its dependencies with uv where `make install-dev` installed it (as fast as the venv's
    # own install; pip otherwise): what is checked below, who owns each file (the distributions' RECORDs)
    # and `pip check`, does not depend on the installer
    uv = Path(sys.executable).parent / "uv"
    if uv.is_file():
        sh([uv, "pip", "install", "-q", "--python", py, f"{wheel}[hf,eval]"], cwd=root)
    else:
        sh([py, "-m", "pip", "install", "-q", "--no-compile", f"{wheel}[hf,eval]"], cwd=root)
    work = root / "empty"  # no source tree here: only what the wheel installed can be imported
    work.mkdir()
    # PYTHONDONTWRITEBYTECODE dropped too: with --no-compile it would make every process of the run compile
    # torch, Ray and transformers from source again (import torch: 2.9 s of CPU instead of 1.4 s here)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE",
                        "RAY_ADDRESS")}  # an embedded Ray: the session's runs the clone's install
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return {"py": py, "xlp": venv / "bin" / "xlp", "work": work, "env": env, "wheel": wheel}


def test_the_wheel_installs_beside_hugging_face_without_sharing_a_file(wheel_env):
    py, work, env = wheel_env["py"], wheel_env["work"], wheel_env["env"]
    sh([py, "-m", "pip", "check"], cwd=work, env=env)
    code = (
        "import collections, importlib.metadata as md, json\n"
        "owners = collections.defaultdict(set)\n"
        "for d in md.distributions():\n"
        "    for f in d.files or ():\n"
        "        if f.suffix != '.pyc' and '.dist-info' not in str(f):\n"
        "            owners[str(f)].add(d.metadata['Name'])\n"
        "print(json.dumps({f: sorted(n) for f, n in owners.items() if len(n) > 1}))\n"
    )
    shared = json.loads(sh([py, "-c", code], cwd=work, env=env).stdout)
    ours = {f: names for f, names in shared.items() if "xlstm-pipeline" in names}
    assert ours == {}, f"files of ours that another distribution also installs: {ours}"
    # Between other distributions, only the __init__.py of a package two of them fill (Ray's dependencies
    # opencensus and opencensus-context both ship opencensus/__init__.py, pkgutil-style): no file of code.
    others = sorted(f for f in shared if not f.endswith("__init__.py"))
    assert others == [], f"files that belong to two other distributions: {others}"
    names = zipfile.ZipFile(wheel_env["wheel"]).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"xlp"}, f"the wheel installs top-level names other than xlp: {tops}"
    for packaged in ("xlp/configs/tiny.yaml", "xlp/configs/demo.yaml", "xlp/configs/eval/xlp_cloze.yaml",
                     "xlp/configs/model/xlstm_large_7b.yaml", "xlp/configs/recipes/xlstm_large_7b.yaml",
                     "xlp/configs/studies/xlstm_vs_llama_cpu.yaml", "xlp/slurm/pipeline.sbatch"):
        assert packaged in names, f"{packaged} is not in the wheel"


def test_a_run_from_the_wheel_in_an_empty_folder(wheel_env, tmp_path):
    xlp, work, env, py = wheel_env["xlp"], wheel_env["work"], wheel_env["env"], wheel_env["py"]
    listed = sh([xlp, "configs"], cwd=work, env=env).stdout
    assert "tiny" in listed and "recipes/xlstm_large_7b" in listed and str(REPO) not in listed
    sh([xlp, "submit", "recipes/xlstm_large_7b", "--to", "slurm", "--dry-run", "--no-check",
        "data.sources=[stdlib:json]"], cwd=work, env=env)
    run = work / "runs" / "tiny"
    # every stage of the packaged tiny config, on an xlstm_large model so that the hf export applies
    r = sh([xlp, "run", "tiny", "model=tiny_xlstm_large", "model.slstm_at=[]", "train.steps=4",
            "train.save_every=4", "train.eval_every=4"], cwd=work, env=env, timeout=1200)
    status = sh([xlp, "status", run], cwd=work, env=env).stdout
    for stage in ("tokenizer", "shard", "train", "eval"):
        assert json.loads((run / stage / "stage.json").read_text())["status"] == "done", (stage, r.stdout[-2000:])
    assert "done" in status
    out = sh([xlp, "generate", run, "--prompt", "def main(", "--max-new-tokens", "8"], cwd=work, env=env)
    assert out.stdout.startswith("def main(")
    export = tmp_path / "hf"
    sh([xlp, "export", run, export, "--format", "hf"], cwd=work, env=env)
    code = (
        "import torch\n"
        "from xlp.xlstm_model import load_model\n"  # ours first, then transformers' xLSTM in the same process
        f"ours = load_model({str(run / 'train' / 'model')!r}).eval()\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(export)!r})\n"
        f"theirs = AutoModelForCausalLM.from_pretrained({str(export)!r}, dtype=torch.float32).eval()\n"
        "ids = torch.tensor([tok.encode('def main(')])\n"
        "with torch.no_grad():\n"
        "    g = theirs.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "    assert torch.equal(g, ours.generate(ids, 5, temperature=0)), (g, ours.generate(ids, 5, temperature=0))\n"
        "import kernels, xlp.kernels\n"
        "assert 'xlp' not in kernels.__file__ and kernels.__file__ != xlp.kernels.__file__\n"
        "print('generated', g.shape[1] - ids.shape[1])\n"
    )
    assert "generated 5" in sh([py, "-c", code], cwd=work, env=env).stdout
