"""One direction of imports: ``platform`` imports ``trainables``, never the reverse."""

from __future__ import annotations

import ast

from conftest import REPO_ROOT

RAY_ADAPTER = "trainables/ray_worker.py"


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_trainables_import_neither_platform_nor_mlflow_and_ray_only_in_the_adapter():
    for path in sorted((REPO_ROOT / "trainables").rglob("*.py")):
        relative = str(path.relative_to(REPO_ROOT))
        for name in imported_modules(path):
            root = name.split(".")[0]
            assert root not in {"platform", "mlflow", "optuna"}, f"{relative} imports {name}"
            if root == "ray":
                assert relative == RAY_ADAPTER, f"{relative} imports {name}; only {RAY_ADAPTER} may"


def test_data_is_in_pixel_space(synthetic_test_set):
    images = [synthetic_test_set[i].image for i in range(10)]
    assert all(0.0 <= float(image.min()) and float(image.max()) <= 1.0 for image in images)
