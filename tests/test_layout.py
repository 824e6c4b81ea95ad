"""The house: one ``slab`` import namespace, the public API resolves, no import circles among
slab's modules, and every module stays small (one job each)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("slab",)  # one folder, one import namespace: slab.core, slab.io, slab.pipeline, ...
MAX_LINES = 500  # a module reads in one sitting; the longest today are slab/pipeline/bundle.py and slab/io/volumes.py (492)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _top_level_imports(path: Path, modules: dict[str, Path], inside_functions: bool = False) -> set[str]:
    """slab modules imported at module level, or anywhere in the module (``inside_functions``: the
    lazy imports that keep ``slab --help`` light still make a dependency)."""
    out = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree) if inside_functions else tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n in modules}
    return out


def test_the_public_api_resolves_every_name():
    import slab

    for name in slab.__all__:
        value = getattr(slab, name)
        assert callable(value), name
        assert value.__module__.startswith("slab."), (name, value.__module__)  # never a bare folder name
    assert slab.Predictor.__module__ == "slab.pipeline.inference.predictor"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        slab.nothing  # noqa: B018


def test_every_module_is_reached_through_slab():
    """The layout test below is not vacuous: it sees slab's modules under their installed names."""
    modules = _modules()
    assert {"slab", "slab.core.errors", "slab.io.volumes", "slab.pipeline.cli", "slab.transforms.post",
            "slab.networks"} <= set(modules)
    imports = _top_level_imports(modules["slab.pipeline.inference.predictor"], modules)
    assert any(name.startswith("slab.transforms") for name in imports), imports
    assert any(name.startswith("slab.io") for name in imports), imports


def test_the_install_exposes_one_namespace(tmp_path):
    """Outside the repository only ``slab`` is importable: no top-level ``pipeline``/``transforms``/
    ``networks`` that would shadow (or be shadowed by) the unrelated packages of those names, and
    nothing in slab's own code or bundles imports them by their folder names."""
    import re
    import subprocess
    import sys

    code = ("import importlib.util, slab, slab.transforms.post as post; "
            "print([importlib.util.find_spec(n) is None for n in ('pipeline', 'transforms', 'networks', 'core')], "
            "slab.load_volume.__module__, post._compiled_fill is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[True,", "True,", "True,", "True]", "slab.io.volumes", "True"]
    bare = re.compile(r"^\s*(from|import) (pipeline|transforms|networks|core)\b|\"(pipeline|transforms|networks|core)\.\w",
                      re.M)
    sources = [p for folder in (*PACKAGES, "tests", "benchmarks", "bundles") for p in (ROOT / folder).rglob("*")
               if p.suffix in {".py", ".json"}]
    offenders = [str(p.relative_to(ROOT)) for p in sources if bare.search(p.read_text(encoding="utf-8"))]
    assert not offenders
    assert len(sources) > 100


# Imports inside functions that may close a circle, with the reason each must stay (none today).
CIRCLE_ALLOWED: dict[tuple[str, str], str] = {}
# The floors, bottom up: a module never imports one of a higher floor (also inside functions).
FLOORS = (("slab.core",), ("slab.io", "slab.transforms", "slab.networks"), ("slab.pipeline",), ("slab",))


def test_no_import_circles():
    """No circle among slab's modules, counting the imports inside functions too."""
    modules = _modules()
    graph = {name: _top_level_imports(path, modules, inside_functions=True) - {name}
             for name, path in modules.items()}
    graph = {name: {d for d in deps if (name, d) not in CIRCLE_ALLOWED} for name, deps in graph.items()}
    # A package __init__ that re-exports its own modules is not a circle through them.
    graph = {name: {d for d in deps if not (name.startswith(d + ".") or d.startswith(name + ".") and
                                              modules[name].name == "__init__.py")} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(name, path):
        state[name] = 1
        for dep in graph[name]:
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_no_import_runs_up_a_floor():
    """core/ imports no other room; io/, transforms/ and networks/ never import pipeline/ or the
    public ``slab`` API; pipeline/ never imports the ``slab`` API module (inside functions too)."""
    def floor(name: str) -> int:
        return next(i for i, prefixes in enumerate(FLOORS)
                    if any(name == p or name.startswith(p + ".") for p in prefixes))

    modules = _modules()
    upward = [(name, dep) for name, path in modules.items() for dep in _top_level_imports(path, modules, True)
              if floor(dep) > floor(name)]
    assert not upward, upward


# Rooms of the pipeline that a room may not import (inside functions too): the trained model lies
# below training and inference, and inference (what a model does) never climbs into training.
BELOW = {"slab.pipeline.model": ("slab.pipeline.training", "slab.pipeline.inference", "slab.pipeline.planning",
                                 "slab.pipeline.evaluation", "slab.pipeline.cli", "slab.pipeline.bundle"),
         "slab.pipeline.inference": ("slab.pipeline.training", "slab.pipeline.planning", "slab.pipeline.cli",
                                     "slab.pipeline.bundle")}


def test_the_trained_model_lies_below_training_and_inference():
    modules = _modules()
    found = [(name, dep) for name, path in modules.items() for room, banned in BELOW.items()
             if name == room or name.startswith(room + ".")
             for dep in _top_level_imports(path, modules, True) if dep.startswith(banned)]
    assert not found, found
    assert "slab.pipeline.model.spec" in modules and "slab.pipeline.checkpoints" not in modules


@pytest.mark.parametrize("path", sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_stays_small(path):
    """Every module of the library (everything under slab/), not only slab/pipeline/."""
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES


def test_the_module_map_names_every_module():
    """DEVELOPERS.md's module map cannot drift: every module of the library is named there by its
    path (a package's ``__init__``/``__main__`` by its folder or itself; the command modules by
    ``slab/pipeline/cli/<command>.py``), and every path the map names exists."""
    import re

    from slab.pipeline.cli import COMMANDS

    text = (ROOT / "DEVELOPERS.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(slab/[\w/]*(?:\.py|/))`", text))
    for row in text.splitlines():  # a folder's row may name its modules by file name
        folders = re.findall(r"^\| `(slab(?:/\w+)+/)`", row)
        named |= {folders[0] + name for name in re.findall(r"`(\w+\.py)`", row)} if folders else set()
    missing = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            folder = rel.rsplit("/", 1)[0] + "/"
            if rel in named or path.name in ("__init__.py", "__main__.py") and (folder in named or any(
                    n.startswith(folder) for n in named)):
                continue
            if folder == "slab/pipeline/cli/" and path.stem in COMMANDS and "slab/pipeline/cli/<command>.py" in text:
                continue
            missing.append(rel)
    assert not missing, f"DEVELOPERS.md's module map lacks {missing}"
    stale = [n for n in named if not (ROOT / n).exists()]
    assert not stale, f"DEVELOPERS.md names modules that do not exist: {stale}"


def test_help_imports_no_engine():
    """``slab --help`` and every ``slab COMMAND --help`` run without torch, MONAI, SimpleITK or
    pyvista: start-up stays a fraction of a second (``benchmarks/bench_startup.py`` times it)."""
    import subprocess
    import sys

    from slab.pipeline.cli import COMMANDS

    code = """
import contextlib, io, sys
from slab.pipeline.cli import main
for argv in [["--help"]] + [[c, "--help"] for c in sys.argv[1:]]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
print(sorted(m for m in ("torch", "monai", "SimpleITK", "pyvista", "nibabel", "scipy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code, *COMMANDS], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_the_wheel_holds_only_the_slab_namespace(tmp_path):
    """A regular (non-editable) build: every file under ``slab/`` (the compiled fill, the bundles and
    the sample volume included) or the ``slab_seg`` metadata, and the console script pointing into
    the namespace. (tests/test_wheel.py installs such a wheel and uses it.)"""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in (*PACKAGES, "bundles", "data"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("slab_seg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"slab", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    assert {"slab/__init__.py", "slab/__main__.py", "slab/pipeline/cli/predict.py", "slab/transforms/post/array.py",
            "slab/networks/factory.py"} <= set(names)
    assert any(n.startswith("slab/transforms/_fill.") and n.endswith((".so", ".pyd")) for n in names)
    for bundle in ("vessel_2p5d", "gi_tract_2p5d", "brats_3d", "spine_cls_2p5d"):
        for name in ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/logging.conf",
                     "docs/README.md", "models/model.pt", "models/model.json", "LICENSE"):
            assert f"slab/bundles/{bundle}/{name}" in names, (bundle, name)
    assert {"slab/data/vessel_phantom/image.nii.gz", "slab/data/vessel_phantom/label.nii.gz"} <= set(names)
    assert {f"slab/pipeline/evaluation/niivue/{n}" for n in ("niivue.umd.js", "LICENSE", "VERSION")} <= set(names)
    entry = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-')[0]}-0.1.0.dist-info/entry_points.txt").decode()
    assert "slab = slab.pipeline.cli:main" in entry


def test_the_tests_are_laid_out_by_room():
    """``tests/<room>/`` mirrors ``slab/<room>/`` (a test module's folder is a room of the library);
    only the whole-package checks stay at the top."""
    tests = sorted((ROOT / "tests").rglob("test_*.py"))
    rooms = {p.parent.relative_to(ROOT / "tests") for p in tests} - {Path(".")}
    assert {"io", "core", "transforms", "networks", "pipeline/inference"} <= {r.as_posix() for r in rooms}
    assert all((ROOT / "slab" / room).is_dir() for room in rooms), sorted(map(str, rooms))
    top = sorted(p.name for p in tests if p.parent == ROOT / "tests")
    assert top == ["test_bad_inputs.py", "test_bundle_zoo.py", "test_bundles.py", "test_demo.py", "test_docs.py",
                   "test_layout.py", "test_wheel.py"]
    assert len({p.name for p in tests}) == len(tests)  # one name per test module: helpers are found by name


def test_no_module_imports_another_modules_private_names():
    """A helper one module takes from another is public in its home (``_name`` stays in its file);
    the compiled fill (``slab.transforms._fill``, optional) is the one private module imported."""
    crossing = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slab"):
                crossing += [(name, node.module, a.name) for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")
                             and a.name not in ("_fill", "_compiled_fill")]
    assert not crossing, crossing
