"""Count the suite's assertions by their syntax trees, so a change that moves or merges tests can show
it dropped none:  python .ci/count_asserts.py [tests/]

Counted in every tests/*.py: `assert` statements, `pytest.raises` / `pytest.warns` calls, calls of
functions whose name starts with `assert_` (torch.testing.assert_close and our helpers); and the test
functions (`def test_*`), parametrized ones once."""
from __future__ import annotations

import ast
import sys
from pathlib import Path


def count(folder: Path) -> dict[str, int]:
    totals = {"assert": 0, "raises/warns": 0, "assert_* calls": 0, "test functions": 0}
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assert):
                totals["assert"] += 1
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                totals["test functions"] += 1
            elif isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in ("raises", "warns"):
                    totals["raises/warns"] += 1
                elif name.startswith("assert_"):
                    totals["assert_* calls"] += 1
    return totals


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "tests")
    for key, value in count(folder).items():
        print(f"{value:6d}  {key}")
