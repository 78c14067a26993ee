"""The roster and the packaging: every plugin folder is registered and complete, READMEs name only what exists,
builders are registered one way, and the base install needs no optional package."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import vlmdistill
from vlmdistill.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIRS = sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").is_file())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_roster_is_every_plugin_folder():
    entry_points = PYPROJECT["project"]["entry-points"]["vlmdistill.plugins"]
    assert sorted(entry_points) == PLUGIN_DIRS
    assert vlmdistill.list_plugins() == PLUGIN_DIRS
    for name, target in entry_points.items():
        assert target.startswith(f"vlmdistill.plugins.{name}:"), (name, target)


@pytest.mark.parametrize("name", PLUGIN_DIRS)
def test_every_plugin_has_its_readme_contract_case_demo_bench_and_config(name):
    cls = vlmdistill.get_plugin(name)
    assert cls.name == name
    assert (ROOT / "plugins" / name / "README.md").is_file()
    assert (ROOT / "tests" / "contract_cases" / f"{name}.py").is_file()
    assert (ROOT / "eval" / "bench" / f"bench_{name}.py").is_file()
    assert sorted((ROOT / "configs" / name).glob("*.yaml")), f"configs/{name}/ has no recipe"
    assert cls.demo == f"vlmdistill.eval.experiments.{name}:main"
    module, function = cls.demo.split(":")
    assert callable(getattr(importlib.import_module(module), function))


# ------------------------------------------------------------------------------------------------ READMEs
DOCS = sorted([ROOT / "README.md", *(ROOT / "plugins").glob("*/README.md"), *(ROOT / "docs").glob("*.md"),
               *(ROOT / "eval").rglob("README.md"), *(ROOT / "vlmdistill").rglob("README.md")])
TOP = ("configs/", "docs/", "eval/", "plugins/", "tests/", "vlmdistill/", ".ci/")
PLACEHOLDER = re.compile(r"[<>*{}$]|\bNAME\b|\bPLUGIN\b|\.\.\.")


CITATION = re.compile(r"\brepository\b|\brepo\b|github", re.I)  # a line citing another codebase's files


def _named_paths(text: str) -> set[str]:
    """Repository paths a document names in backticks (`configs/kd/demo.yaml`, `eval/bench/`), except on lines
    that cite another repository's files."""
    found = set()
    for line in text.splitlines():
        if CITATION.search(line):
            continue
        for span in re.findall(r"`([^`]+)`", line):
            for token in span.split():
                token = token.rstrip(".,;:)").split("::")[0]
                if token.startswith(TOP) and not PLACEHOLDER.search(token):
                    found.add(token)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_readme_names_exists(doc):
    missing = [p for p in sorted(_named_paths(doc.read_text())) if not (ROOT / p).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


def _commands(text: str) -> set[str]:
    """`vlmdistill SUB ...`, `python -m MODULE` and `make TARGET` command lines in code spans and blocks."""
    spans = re.findall(r"`([^`\n]+)`", text) + [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
                                                for line in block.splitlines()]
    return {span.strip() for span in spans}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_a_readme_names_exists(doc):
    from vlmdistill.cli import BUILT_IN

    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, re.M))
    subcommands = set(BUILT_IN) | {c for name in PLUGIN_DIRS for c in vlmdistill.get_plugin(name).commands}
    problems = []
    for line in _commands(doc.read_text()):
        for module in re.findall(r"python -m ([\w.]+)", line):
            if module.split(".")[0] in ("vlmdistill", "pytest", "pip", "venv") and module.split(".")[0] == "vlmdistill":
                if importlib.util.find_spec(module) is None:
                    problems.append(f"python -m {module}")
        for sub in re.findall(r"(?:^|[\s(])vlmdistill ([a-z][\w-]*)", line):
            if sub not in subcommands:
                problems.append(f"vlmdistill {sub}")
        for target in re.findall(r"(?:^|[\s(])make ([a-z][\w-]*)", line):
            if target not in targets:
                problems.append(f"make {target}")
    assert not problems, f"{doc.relative_to(ROOT)} names commands that do not exist: {sorted(set(problems))}"


# ------------------------------------------------------------------------------------------------ builders
def test_importing_a_plugin_registers_no_builder_and_recipes_find_them_all():
    code = ("import sys, vlmdistill, vlmdistill.recipes as r\n"
            "for name in vlmdistill.list_plugins(): vlmdistill.get_plugin(name)\n"
            "assert not [m for m in sys.modules if m.endswith('.recipes') and m.startswith('vlmdistill.plugins')]\n"
            "assert r._MODEL_BUILDERS.keys() <= {'from-config', 'open-clip'}, sorted(r._MODEL_BUILDERS)\n"
            "found = r.registered_builders()\n"
            "assert {'msd-digits-clip', 'ccd-vit', 'dcclip-hf-clip', 'lingudistill-toy-lm'} <= set(found['model'])\n"
            "assert {'image-text', 'text-blocks', 'msd-digit-captions', 'ccd-rendered-words', 'text-lmdb',\n"
            "        'dcclip-image-text'} <= set(found['data'])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


def test_importing_every_plugin_module_trains_nothing_and_writes_nothing(tmp_path):
    """Every module of every plugin folder (its recipe builders included) imports without demo code
    (`vlmdistill.eval`) or demo data packages, and leaves the working directory as it was."""
    code = ("import importlib, pkgutil, sys, vlmdistill\n"
            "for name in vlmdistill.list_plugins():\n"
            "    package = importlib.import_module(f'vlmdistill.plugins.{name}')\n"
            "    for module in pkgutil.iter_modules(package.__path__):\n"
            "        importlib.import_module(f'{package.__name__}.{module.name}')\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('sklearn', 'matplotlib', 'skimage')\n"
            "          or m.startswith('vlmdistill.eval')]\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())


def test_a_builder_name_registered_twice_is_refused():
    from vlmdistill.recipes import _MODEL_BUILDERS, register_model_builder

    @register_model_builder("house-test-builder")
    def first():
        return None

    try:
        register_model_builder("house-test-builder")(first)  # the same function again (a reload) is fine
        with pytest.raises(ConfigError, match="registered twice.*first.*second"):
            @register_model_builder("house-test-builder")
            def second():
                return None
        assert _MODEL_BUILDERS["house-test-builder"] is first
    finally:
        _MODEL_BUILDERS.pop("house-test-builder", None)


def test_an_unknown_builder_lists_the_registered_ones():
    from vlmdistill.recipes import ModelSpec, build_model

    with pytest.raises(ConfigError, match="unknown model builder 'nope'; registered: .*msd-digits-clip"):
        build_model(ModelSpec(builder="nope"), role="student")


# ------------------------------------------------------------------------------------------------ packaging
OPTIONAL = ("webdataset", "sklearn", "matplotlib", "skimage", "lmdb", "deepspeed")


def test_the_base_install_trains_every_plugin_without_the_optional_packages():
    """With every optional package unimportable: wrap every plugin's contract case and run a training step (forward,
    backward, step end); features that need an extra name it."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
import torch, vlmdistill
from contract_cases import load_case
cases = {{name: load_case(name) for name in vlmdistill.list_plugins()}}
batches = {{name: case.batch(4, seed=0) for name, case in cases.items()}}  # test inputs may use any package
for name in {OPTIONAL!r}:
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[loaded]
    sys.modules[name] = None  # any import of it now raises ImportError
for name, case in cases.items():
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin=name, teacher=case.make_teacher(student), config=dict(case.config),
                              **case.runtime)
    wrapped.train()
    wrapped.plugin.on_accumulation_window([batches[name]])
    out = wrapped(**batches[name])
    out.loss.backward()
    assert torch.isfinite(out.loss), name
    wrapped.step_end()
from vlmdistill.errors import MissingDependencyError
from vlmdistill.data.digits import load_digits_images
try:
    load_digits_images()
except MissingDependencyError as error:
    assert "scikit-learn" in str(error) and "vlmdistill[demo]" in str(error), error
else:
    raise AssertionError("no error without scikit-learn")
from vlmdistill.plots import new_figure
try:
    new_figure()
except MissingDependencyError as error:
    assert "matplotlib" in str(error) and "vlmdistill[demo]" in str(error), error
else:
    raise AssertionError("no error without matplotlib")
print("ok", sorted(m for m in {OPTIONAL!r} if sys.modules.get(m) is not None))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.strip().endswith("ok []")


def _declared() -> set[str]:
    names = list(PYPROJECT["project"]["dependencies"])
    names += [d for extra in PYPROJECT["project"]["optional-dependencies"].values() for d in extra]
    return {re.split(r"[\s<>=!;\[~]", d, maxsplit=1)[0].lower().replace("_", "-") for d in names}


def test_every_third_party_import_is_declared():
    """Every top-level module the package imports (vlmdistill/, plugins/, eval/) comes from a distribution named in
    pyproject.toml's dependencies or extras."""
    import ast
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    imported: dict[str, str] = {}
    for folder in ("vlmdistill", "plugins", "eval"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    imported.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    declared = _declared() | {"vlmdistill"}
    undeclared = {}
    for module, where in imported.items():
        if module in stdlib or module in ("vlmdistill", "flash_attn", "deepspeed"):
            continue
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not dists & declared:
            undeclared[module] = (sorted(dists), where)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_triton_is_a_linux_only_requirement():
    triton = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("triton")]
    assert triton and "platform_system == 'Linux'" in triton[0]


# ------------------------------------------------------------------------------------------------ config tables
def _config_table(text: str) -> dict[str, str]:
    """{key: default cell} of a README's config table (header `| key | ... | default | ...`; a row may name
    several keys: `` `a`, `b` ``)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^\|\s*key\s*\|", line))
    header = [c.strip() for c in lines[start].strip().strip("|").split("|")]
    column = header.index("default")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        keys = re.findall(r"`([^`]+)`", cells[0])
        parts = [p.strip() for p in re.split(r",\s*(?![^\[(]*[\])])", cells[column])]
        for i, key in enumerate(keys):
            rows[key] = parts[i] if len(keys) > 1 and len(parts) == len(keys) else cells[column]
    return rows


# named defaults a table may use instead of the numbers
NAMED_DEFAULTS = {"ImageNet": [(0.485, 0.456, 0.406), (0.229, 0.224, 0.225)],
                  "OpenAI CLIP": [(0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)]}


def _same_default(cell: str, value) -> bool:
    import dataclasses
    import math

    cell = re.sub(r"\s*\[inferred\]", "", cell).replace("`", "").strip()
    if cell in NAMED_DEFAULTS:
        return tuple(value) in NAMED_DEFAULTS[cell]
    if dataclasses.is_dataclass(value) or cell in ("see below", "see above"):
        return dataclasses.is_dataclass(value) or isinstance(value, (dict, list, tuple))
    if isinstance(value, bool) or value is None:
        return cell.lower() in {str(value).lower(), "null" if value is None else "-"}
    if isinstance(value, (int, float)):
        try:
            number = float(eval(cell, {"__builtins__": {}}, {"ln": math.log, "exp": math.exp}))
        except Exception:
            return False
        return math.isclose(number, float(value), rel_tol=1e-6)
    if isinstance(value, (list, tuple, dict)):
        squash = lambda s: re.sub(r"[\s'\"()\[\]{}]", "", s)  # noqa: E731
        return squash(cell) == squash(str(list(value) if isinstance(value, tuple) else value))
    return cell == str(value)


@pytest.mark.parametrize("name", PLUGIN_DIRS)
def test_each_readme_config_table_equals_the_config_class(name):
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(vlmdistill.get_plugin(name).config_class)}
    table = _config_table((ROOT / "plugins" / name / "README.md").read_text())
    assert sorted(table) == sorted(fields), (f"README only: {sorted(set(table) - set(fields))}; "
                                             f"config only: {sorted(set(fields) - set(table))}")
    wrong = {}
    for key, field in fields.items():
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if not _same_default(table[key], default):
            wrong[key] = (table[key], default)
    assert not wrong, f"README default vs config default: {wrong}"


def test_save_pretrained_refuses_unknown_keywords(tmp_path):
    from contract_cases import load_case

    case = load_case("kd")
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin="kd", teacher=case.make_teacher(student), config=dict(case.config))
    with pytest.raises(TypeError, match="max_shard_size"):
        wrapped.save_pretrained(str(tmp_path / "a"), max_shard_size="1GB")
    wrapped.save_pretrained(str(tmp_path / "b"), is_main_process=True)  # what the Trainer passes
    assert (tmp_path / "b" / vlmdistill.io.PLUGIN_CONFIG_NAME).is_file()


def test_metrics_are_logged_beside_the_loss_terms_but_are_no_part_of_them():
    from contract_cases import load_case

    case = load_case("ccd")
    student = case.make_student()
    wrapped = vlmdistill.wrap(student, plugin="ccd", teacher=case.make_teacher(student), config=dict(case.config),
                              **case.runtime)
    wrapped.train()
    out = wrapped(**case.batch(4, seed=0))
    assert set(out.loss_terms) == {"seg", "distill"} and {"paired_characters", "teacher_entropy"} <= set(out.metrics)
    assert "distill/paired_characters" in wrapped.pop_logged_terms()  # logged as before


BENCHES = sorted(p.stem for p in (ROOT / "eval" / "bench").glob("bench_*.py"))


@pytest.mark.parametrize("bench", BENCHES)
def test_every_benchmark_writes_its_numbers_through_the_one_out_flag(bench, tmp_path):
    """One output flag across benchmarks: `--out DIR` (results.json + results.md), no `--json FILE`."""
    source = (ROOT / "eval" / "bench" / f"{bench}.py").read_text()
    assert "add_out_argument(" in source and "write_results(" in source, f"{bench} has no --out DIR"
    assert '"--json"' not in source
    from vlmdistill.eval.bench.output import write_results

    write_results(tmp_path / "run", {"ratio": 1.25}, "| step | ratio |\n")
    assert (tmp_path / "run" / "results.json").read_text().strip() == '{\n  "ratio": 1.25\n}'
    assert (tmp_path / "run" / "results.md").read_text() == "| step | ratio |\n"
