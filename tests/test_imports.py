"""The package's import graph: no cycle in dcgen/ (function-level imports included) and no
private name imported from another module (dcgen/, tasks/, tools/)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str], root: Path = ROOT):
    """(module imported, names taken from it) for every import statement anywhere in the file,
    relative ones resolved; only modules in `known` count as edges."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in known else target), alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None


def graph(folder: str, root: Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in (root / folder).rglob("*.py")}
    return {m: {t for t, _ in imports(p, set(files), root) if t in files and t != m}
            for m, p in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_dcgen():
    assert cycles(graph("dcgen")) == []


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n    return g\n")
    assert cycles(graph("pkg", tmp_path)) == [["pkg.a", "pkg.b"]]


def test_no_private_name_is_imported_from_another_module():
    found = []
    for folder in ("dcgen", "tasks", "tools"):
        files = {module_name(p): p for p in (ROOT / folder).rglob("*.py")}
        for m, p in files.items():
            for target, name in imports(p, set(files)):
                if name and name.startswith("_") and not name.startswith("__") and target != m \
                        and (target.startswith(("dcgen", "tasks", "tools"))):
                    found.append(f"{p.relative_to(ROOT)} imports {name} from {target}")
    assert not found, "\n".join(found)


def test_the_training_loop_reads_in_one_sitting():
    """train() stays a short top-level function, and the loop never asks which model it trains
    (the model family declares its hooks: dcgen.models.hooks)."""
    tree = ast.parse((ROOT / "dcgen" / "train.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert fn.end_lineno - fn.lineno + 1 <= 120
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
        {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "DCDiT" not in names and "DiT" not in names


def test_each_model_family_declares_its_training_hooks():
    from omegaconf import OmegaConf

    from dcgen.models.hooks import ChunkingHooks, TrainingHooks
    from dcgen.models import DCDiT, DiT
    dc = OmegaConf.create({"multi_budget": True, "multi_budget_start_step": 0, "budgets": [0.5],
                           "target_n": 4.0, "n_warmup_steps": 0, "n_start": 4.0, "ratio_weight": 0.03,
                           "ratio_group_size": 4})
    dit = DiT(input_size=[8, 8], in_channels=3, num_classes=0, hidden_size=32, depth=1, num_heads=2)
    dcd = DCDiT(input_size=[8, 8], in_channels=3, num_classes=0, hidden_size=32, depth=1, num_heads=2,
                norm_groups=4)
    plain, chunking = dit.training_hooks(dc), dcd.training_hooks(dc)
    assert type(plain) is TrainingHooks and isinstance(chunking, ChunkingHooks)
    assert plain.budget(5) == (0.0, 4.0) and plain.auxiliary_loss([], 4.0) is None
    assert chunking.budget(5) == (0.5, 4.0) and chunking.aux_weight == 0.03
    import torch
    _, aux = dcd(torch.randn(2, 3, 8, 8), torch.tensor([1, 500]), None)
    assert chunking.auxiliary_loss(aux, 4.0).ndim == 0


def test_tools_are_drivers_importing_neither_tests_nor_each_other():
    """tools/ holds drivers of the package: no import of tests/ (oracles live in
    dcgen.chunking.reference), of another tool, or of a path put on sys.path by hand."""
    tools = {p.stem for p in (ROOT / "tools").glob("*.py")}
    tests = {p.stem for p in (ROOT / "tests").glob("*.py")}
    found = []
    for p in sorted((ROOT / "tools").glob("*.py")):
        text = p.read_text()
        if "sys.path" in text or "spec_from_file_location" in text:
            found.append(f"{p.name}: loads code by path")
        for target, _ in imports(p, set()):
            top = target.split(".")[0]
            if top in tools | tests | {"oracles"}:
                found.append(f"{p.name} imports {target}")
    assert not found, found
