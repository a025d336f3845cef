"""The package's folders are the course's parts, and imports only go down the data flow.

    model  <-  hf, data  <-  traces  <-  placement  <-  parallel          compress  <-  model, data, hf

A part may import itself and the parts listed for it below; nothing in the package imports the command line
(`cli`, `demo`, `__main__`) or the widgets. Imports are read with `ast`, so lazy imports inside functions count.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minimoe"
PARTS = ("model", "hf", "data", "traces", "placement", "parallel", "compress")
MAY_IMPORT = {
    "model": set(),
    "hf": {"model"},
    "data": {"model"},
    "traces": {"model", "hf", "data"},  # recording traces of transformers checkpoints (minimoe trace --hf)
    "placement": {"model", "data", "traces"},
    "parallel": {"model", "data", "traces", "placement"},
    "compress": {"model", "data", "hf"},
}
ENTRY_POINTS = {"cli", "demo", "__main__"}
SHARED = {"arguments"}  # argparse types every command may use; imports nothing from minimoe


def imported_modules(path: Path) -> set[str]:
    """Every minimoe module named by an import statement in `path` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "minimoe" or name.startswith("minimoe.")}


def part_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def package_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down_the_data_flow(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    for module in imported_modules(path):
        target = part_of(module)
        if target is None or target == own or target == "__version__" or target in SHARED:
            continue
        assert target != "widgets", f"{path.name} imports the widgets ({module}); the package never does"
        if own in ENTRY_POINTS:
            continue  # the command line may use every part
        assert target not in ENTRY_POINTS, f"{path.relative_to(PACKAGE)} imports the command line ({module})"
        assert own in MAY_IMPORT, f"{path.relative_to(PACKAGE)} lies outside the course's parts {PARTS}"
        assert target in MAY_IMPORT[own], (
            f"{path.relative_to(PACKAGE)} (part {own!r}) imports {module} (part {target!r}); "
            f"{own!r} may import only {sorted(MAY_IMPORT[own]) or 'nothing else'}")


def test_every_module_lives_in_a_part():
    loose = {p.stem for p in PACKAGE.glob("*.py")} - ENTRY_POINTS - SHARED - {"__init__"}
    assert not loose, f"modules outside the course's parts: {sorted(loose)}"


def test_the_shared_argument_types_import_nothing_from_the_package():
    for name in SHARED:
        assert not imported_modules(PACKAGE / f"{name}.py"), f"minimoe.{name} imports from the package"


def test_the_trace_format_knows_nothing_of_models():
    """format.py imports from the package only its file layout (trace_file.py), the safe .npz reader and the checks
    of its layer numbers (layer_ids.py), and those import nothing else from it."""
    for file, allowed in (("format.py", ("minimoe.traces.npz", "minimoe.traces.trace_file", "minimoe.traces.layer_ids")),
                          ("trace_file.py", ("minimoe.traces.npz",))):
        imported = {name for name in imported_modules(PACKAGE / "traces" / file) if not name.startswith(allowed)}
        assert not imported, f"{file} imports {sorted(imported)}"
    assert not imported_modules(PACKAGE / "traces" / "npz.py")
    assert not imported_modules(PACKAGE / "traces" / "layer_ids.py")
    for file in ("format.py", "trace_file.py", "npz.py", "layer_ids.py"):
        assert "import torch" not in (PACKAGE / "traces" / file).read_text()


@pytest.mark.parametrize("part, names", [
    ("model", ["ModelConfig", "Transformer", "MoELayer", "MoEConfig", "Router", "generate"]),
    ("hf", ["from_hf", "to_hf"]),
    ("data", ["load_corpus", "train", "train_tokenizer"]),
    ("traces", ["Trace", "record", "from_vllm", "from_sglang", "from_jsonl", "synthetic_trace"]),
    ("placement", ["place", "Placement", "Topology", "eplb", "group", "measure"]),
    ("parallel", ["dispatch", "combine", "ExpertParallelMoE", "expert_parallel", "WIRE_FORMATS"]),
    ("compress", ["pic_mask", "global_mask", "gist_mask", "causal_mask", "Compressor", "exact_match", "f1_score"]),
])
def test_each_part_exposes_its_main_names_and_says_which_chapter_teaches_it(part, names):
    module = importlib.import_module(f"minimoe.{part}")
    for name in names:
        assert hasattr(module, name), f"minimoe.{part} does not expose {name}"
        assert name in module.__all__
    assert "hapter" in (module.__doc__ or ""), f"minimoe.{part}'s docstring names no chapter"


def test_no_module_is_left_at_its_old_flat_path():
    old = ["dense", "router", "moe", "generate", "hf_llama", "hf_moe", "hf_moe_models", "corpora_chat",
           "corpora_math", "tokenizer", "train", "trace_import", "recording", "analysis", "findings", "workload",
           "synthetic", "topology", "eplb", "locality", "locality_slots", "grouping", "traffic", "experiments",
           "report"]
    for name in old:
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"minimoe.{name}")
