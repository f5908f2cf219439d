"""The shape that keeps the five scripts alike (one skeleton, the same names in the same places; shared/CONVENTIONS.md):
a reader who knows one script finds everything in another by its place and name, the training loop reads at a
glance, and the lesson part (everything above train) stands on its own, copied without the run machinery."""
import ast
import importlib

import pytest

from conftest import ROOT

SCRIPTS = ["ddpm", "vae", "gan", "pixelcnn", "pixelrnn"]
# the top-level names every script defines, in this order (gan's loss is the pair d_loss, g_loss)
SKELETON = ["ModelConfig", "Config", "PRESETS", "build_model", "loss_fn", "sample", "sample_grid", "train",
            "load_for_inference", "evaluate", "sample_from_checkpoint", "main"]
MODES = ["plot", "sample", "eval", "complete", "receptive_field"]  # main()'s branches, in this order, then train
LESSON_MAY_USE = {"opt", "ModelConfig", "RunConfig", "UsageError", "NUM_CLASSES", "save_grid", "signed_to_unit",
                  "class_labels"}  # common.py's names that the lesson part may use: config, errors, labels, pictures
TRAIN_LINES = {"ddpm": 35, "vae": 35, "gan": 45, "pixelcnn": 35, "pixelrnn": 35}


def tree(script):
    return ast.parse((ROOT / f"{script}.py").read_text())


def top_level(script):
    """{name: line} of the script's top-level functions, classes and assignments."""
    names = {}
    for node in tree(script).body:
        targets = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        names.update({name: node.lineno for name in targets if name not in names})
    return names


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_skeleton_names_come_in_order(script):
    names = top_level(script)
    skeleton = [("d_loss" if script == "gan" and n == "loss_fn" else n) for n in SKELETON]
    missing = [n for n in skeleton if n not in names]
    assert not missing, missing
    lines = [names[n] for n in skeleton]
    assert lines == sorted(lines), [n for n, _ in sorted(zip(skeleton, lines), key=lambda p: p[1])]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_modes_of_main_come_in_order(script):
    main = next(n for n in tree(script).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    tested = [n.test.attr for n in ast.walk(main) if isinstance(n, ast.If) and isinstance(n.test, ast.Attribute)]
    assert tested == [m for m in MODES if m in tested] and tested[:3] == ["plot", "sample", "eval"], tested


@pytest.mark.parametrize("script", SCRIPTS)
def test_train_reads_at_a_glance(script):
    train = next(n for n in tree(script).body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= TRAIN_LINES[script]
    called = {n.func.attr for n in ast.walk(train) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert {"start", "check", "log", "finish"} <= called  # the run's machinery is called, not spelled out


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_lesson_part_uses_common_only_for_configs_errors_labels_and_pictures(script):
    body = tree(script).body
    end = next(i for i, n in enumerate(body) if isinstance(n, ast.FunctionDef) and n.name == "train")
    used = {n.attr for node in body[:end] for n in ast.walk(node)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "common"}
    assert used <= LESSON_MAY_USE, used - LESSON_MAY_USE


@pytest.mark.parametrize("script", SCRIPTS + ["common"])
def test_no_line_is_longer_than_120_characters(script):
    long = [i + 1 for i, line in enumerate((ROOT / f"{script}.py").read_text().splitlines()) if len(line) > 120]
    assert not long, long


def test_common_stays_small():
    """The infrastructure serves the lessons: common.py at most 690 lines (it was 803 before class Run, 650 after;
    the folder lock, a full disk, a step too big for memory, and time budgets that hold over resumes took the rest)."""
    assert len((ROOT / "common.py").read_text().splitlines()) <= 690


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_script_imports_another(script):
    imported = {a.name.split(".")[0] for n in ast.walk(tree(script)) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}
    assert not imported & (set(SCRIPTS) - {script}), imported
    importlib.import_module(script)  # and it imports on its own
