"""The package reads from the ground floor up: every import between our own modules, the ones written
inside functions included, points down the floors below, and no set of modules imports itself in a
circle. The floors are DESIGN.md's (`pipeline -> xlstm_model -> kernels`, `pipeline -> tokenizer`; inside
pipeline/ from cli down to core/). A failure names the module, the line and the arrow."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOPS = ("kernels", "tokenizer", "xlstm_model", "pipeline")

# Floors, bottom first. A module may import its own floor's modules and those of floors listed before
# it; a floor is a package (every module under it) or a single module.
FLOORS = (
    "kernels",
    "tokenizer",
    "xlstm_model",
    "pipeline.core",
    "pipeline.data",
    "pipeline.trained",  # a trained model found and loaded (generate, export, the lm-eval adapter)
    "pipeline.train",
    "pipeline.eval",
    "pipeline.generate",
    "pipeline.export",
    "pipeline.cluster",
    "pipeline.stages",
    "pipeline.runner",
    "pipeline.study",
    "pipeline.cli",
)
# Heavy (or optional) third-party libraries: the only imports allowed inside a function. They cost from a
# tenth of a second (numpy) to seconds (torch, deepspeed, ray) to import, or come with an extra, and most
# commands never need them. Everything else, ours and the standard library's, is imported at the top of
# the module, except a package __init__'s lazy re-exports of its own modules (PEP 562 __getattr__, through
# importlib), which keep the torch-free config modules importable without torch.
HEAVY = ("torch", "triton", "deepspeed", "ray", "transformers", "lm_eval", "wandb", "datasets", "matplotlib",
         "safetensors", "fsspec", "numpy", "zstandard", "pyarrow", "sentencepiece", "tokenizers", "webdataset",
         "huggingface_hub")


# The model and the kernels run on a machine with only torch and triton (a bare GPU node in the campaign):
# any other third-party library they can use is optional there, so imported where it is used.
BARE_TORCH = ("kernels", "xlstm_model")


def our_modules() -> dict[str, Path]:
    mods = {}
    for top in TOPS:
        for path in (REPO / top).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = our_modules()


def resolve(name: str) -> str:
    """The module (of ours) an imported dotted name lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function) for every import statement of `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    stem = ".".join(base + ([child.module] if child.module else []))
                else:
                    stem = child.module or ""
                names = [f"{stem}.{a.name}" for a in child.names] if stem else []
            for name in names:
                name = name.removeprefix("xlp.")
                if name.split(".")[0] in TOPS:
                    target = resolve(name)
                    if target and target != module:
                        found.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def floor(module: str) -> int:
    best = -1
    for i, name in enumerate(FLOORS):
        if module == name or module.startswith(name + "."):
            best = i if best < 0 or len(name) > len(FLOORS[best]) else best
    return best


def test_every_module_has_a_floor():
    missing = sorted(m for m in MODULES if m not in TOPS and m != "pipeline" and floor(m) < 0)
    assert not missing, f"modules on no floor (add them to FLOORS in {__file__}): {missing}"


def test_every_import_points_down():
    wrong = []
    for module in sorted(MODULES):
        if module == "pipeline":
            continue
        for target, line, _ in imports(module):
            if floor(target) > floor(module):
                wrong.append(f"{MODULES[module].relative_to(REPO)}:{line}: {module} ({FLOORS[floor(module)]}) "
                             f"imports {target} ({FLOORS[floor(target)]}), a floor above it")
    assert not wrong, "imports pointing up:\n" + "\n".join(wrong)


def test_no_import_circle():
    graph = {m: sorted({t for t, _, _ in imports(m)}) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            # a package's __init__ re-exporting its own modules is not a circle of meaning
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            strongconnect(v)
    described = []
    for component in circles:
        members = set(component)
        arrows = [f"{m} -> {t} ({MODULES[m].relative_to(REPO)}:{line})" for m in component
                  for t, line, _ in imports(m) if t in members]
        described.append("circle of " + ", ".join(component) + ":\n    " + "\n    ".join(arrows))
    assert not circles, "\n".join(described)


# Our modules that stand for an optional third-party library (an extra): importing them needs it, so they
# are imported where they are used, as the library itself would be.
OPTIONAL_EXTRAS = {
    "pipeline.eval.harness": "lm_eval, the `eval` extra (it subclasses lm-eval's LM when imported)",
}


def function_level_imports(module: str) -> list[tuple[str, int]]:
    """(imported name, line) of every import statement inside a function of `module`, ours and others'."""
    path = MODULES[module]
    out = []
    for fn in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    out += [(a.name, node.lineno) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    out.append((node.module, node.lineno))
    return sorted(set(out), key=lambda item: item[1])


def test_imports_inside_functions_are_only_heavy_libraries():
    """An import inside a function is for a heavy third-party library; ours and the standard library's are
    imported at the top, so the import graph is the one a reader sees."""
    wrong = []
    for module in sorted(MODULES):
        path = MODULES[module]
        for name, line in function_level_imports(module):
            top = name.split(".")[0]
            ours = resolve(name.removeprefix("xlp.")) if top == "xlp" else None
            if top in HEAVY or (ours and ours in OPTIONAL_EXTRAS):
                continue
            if module.split(".")[0] in BARE_TORCH and top not in sys.stdlib_module_names and top != "xlp":
                continue  # optional where the model and kernels run with torch and triton alone

            wrong.append(f"{path.relative_to(REPO)}:{line}: imports {name} inside a function")
    for module in sorted(MODULES):  # and nothing of ours is imported inside a function by another route
        for target, line, in_function in imports(module):
            lazy_init = MODULES[module].name == "__init__.py" and target.startswith(module + ".")
            if in_function and not lazy_init and target not in OPTIONAL_EXTRAS:
                wrong.append(f"{MODULES[module].relative_to(REPO)}:{line}: imports {target} inside a function")
    assert not wrong, "imports inside functions of what is not a heavy library:\n" + "\n".join(sorted(set(wrong)))


def test_every_package_folder_is_in_pyproject():
    """setuptools' package-dir maps each folder to its xlp.* name; a folder missing from `packages` would
    be left out of the wheel."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"xlp." + ".".join(p.parent.relative_to(REPO).parts) for top in TOPS for p in (REPO / top).rglob("*.py")}
    assert folders <= listed, f"folders with Python files missing from pyproject's packages: {sorted(folders - listed)}"


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` run by a new interpreter of this venv, outside the clone (what it imports is only what the
    installed package and the code load)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")


@pytest.mark.parametrize("module", ["xlp.pipeline.core.config", "xlp.pipeline.core.registry", "xlp.pipeline.core.lock"])
def test_the_ground_floor_loads_without_torch(module):
    """Loading and validating a config needs neither torch nor the model code."""
    code = (f"import sys, {module}\n"
            "from xlp.pipeline.core.config import load_config\n"
            "cfg = load_config('tiny')\n"
            "heavy = sorted(m for m in ('torch', 'triton', 'deepspeed', 'ray', 'xlp.xlstm_model.lm') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    out = fresh_python(code)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("module", ["xlp.pipeline.cli", "xlp.pipeline.runner", "xlp.pipeline.cluster.launch",
                                    "xlp.pipeline.cluster.submit", "xlp.pipeline.study.report"])
def test_the_xlp_command_starts_without_torch(module):
    """`xlp status`, `xlp submit`, `xlp run`'s driver and the launchers import no torch (nor numpy): 1.5 s of
    CPU per command on a small machine. Only the verbs and stages that use a model load it, on first use."""
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'deepspeed', 'xlp.xlstm_model.lm') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    out = fresh_python(code)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("module", ["xlp.pipeline.stages.train", "xlp.pipeline.stages.eval", "xlp.pipeline.generate",
                                    "xlp.pipeline.export"])
def test_the_model_and_kernels_load_without_dynamo(module):
    """The processes that use a model without compiling it (the train stage's pre-launch checks, the eval
    stage, `xlp generate` and `xlp export`) do not import torch._dynamo: 1.1 s of CPU each on a small
    machine. Building a model and running a kernel does not load it either; compiling does."""
    code = (f"import sys, torch, {module}\n"
            "from xlp import kernels\n"
            "from xlp.xlstm_model import ModelConfig, build_model\n"
            "model = build_model(ModelConfig(arch='xlstm', vocab_size=64, d_model=32, num_blocks=2, num_heads=2))\n"
            "model(torch.randint(0, 64, (1, 16)))\n"
            "kernels.rms_norm(torch.randn(2, 8), torch.ones(8))\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n")
    out = fresh_python(code)
    assert out.returncode == 0, out.stderr
