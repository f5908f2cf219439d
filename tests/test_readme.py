"""Every `python <script>.py ...` command in README.md's code blocks (and in each script's docstring) is accepted
by that script's parser: the flags exist, the values have the right type and lie in their ranges."""
import importlib
import re
import shlex

import pytest

import common
from conftest import ROOT

SCRIPTS = ["ddpm", "vae", "gan", "pixelcnn", "pixelrnn"]


def commands(text):
    """(script, argv) for each `python <script>.py ...` line of the text's code blocks, joined over trailing
    backslashes, with the shell comment cut off."""
    found = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not re.match(r"\s*([A-Z_]+=\S+\s+)*(python|torchrun) ", line):
                continue
            words = shlex.split(line, comments=True)
            while words and "=" in words[0]:  # an environment variable before the command: OMP_NUM_THREADS=1
                words = words[1:]
            if words and words[0] == "torchrun":  # torchrun's own options, then the script and its flags
                words = ["python"] + words[next((i for i, w in enumerate(words) if w.endswith(".py")), len(words)):]
            if len(words) >= 2 and words[0] == "python" and words[1].removesuffix(".py") in SCRIPTS:
                found.append((words[1].removesuffix(".py"), words[2:]))
    return found


def docstring_commands(script):
    doc = importlib.import_module(script).__doc__
    return commands("```\n" + doc.replace("\\\\\n", "\\\n") + "```")


README = commands((ROOT / "README.md").read_text())
DOCS = [c for s in SCRIPTS for c in docstring_commands(s)]


def test_readme_has_commands_for_every_script():
    assert {script for script, _ in README} == set(SCRIPTS)
    assert {script for script, _ in DOCS} == set(SCRIPTS)


@pytest.mark.parametrize("script,argv", README + DOCS, ids=[" ".join([s] + a)[:80] for s, a in README + DOCS])
def test_the_parser_accepts_the_command(script, argv):
    module = importlib.import_module(script)
    common.parse_flags(module.ModelConfig, module.Config, argv)


def test_the_extraction_sees_continuations_comments_and_torchrun():
    text = ("```bash\nA=1 python vae.py --steps 5 \\\n    --lr 0.1   # a comment\necho no\n"
            "torchrun --standalone --nproc_per_node=4 gan.py --eval\n```\n")
    assert commands(text) == [("vae", ["--steps", "5", "--lr", "0.1"]), ("gan", ["--eval"])]
