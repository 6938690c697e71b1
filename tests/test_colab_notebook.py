"""docs/colab.ipynb, the Colab TPU path: a valid notebook whose commands and config cell still work with this
flaxlab (it cannot run here: it clones from the internet, mounts Google Drive and downloads through TFDS)."""
import json
import shlex

import pytest

from conftest import REPO
from experiments import cli
from flaxlab.config import validate

NOTEBOOK = json.loads((REPO / "docs" / "colab.ipynb").read_text())
CODE = ["".join(cell["source"]) for cell in NOTEBOOK["cells"] if cell["cell_type"] == "code"]
COMMANDS = [line.split("!python -m experiments ", 1)[1] for cell in CODE for line in cell.splitlines()
            if line.startswith("!python -m experiments ")]
WHERE = {"--workdir", "--data-dir"}  # options of the command, not of the config, with a value
FLAGS = {"--resume", "--quiet", "--peer"}


def test_it_is_a_notebook_colab_opens_clean():
    assert NOTEBOOK["nbformat"] == 4 and NOTEBOOK["metadata"]["accelerator"] == "TPU"
    assert all(cell["cell_type"] in ("code", "markdown") and isinstance(cell["source"], list)
               for cell in NOTEBOOK["cells"])
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in NOTEBOOK["cells"] if cell["cell_type"] == "code")
    assert len(COMMANDS) >= 4 and any("--resume" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_names_an_experiment_and_options_this_flaxlab_takes(command, capsys):
    """`show` with the command's config options: an option or value renamed since would fail here."""
    words = shlex.split(command.replace("{RUNS}", "/tmp/runs"))
    assert words[0] in ("run", "sweep", "bench"), words
    overrides, rest = [], iter(words[2:])
    for word in rest:
        if word in WHERE:
            next(rest)  # its value
        elif word not in FLAGS:
            overrides.append(word)
    assert cli.main(["show", words[1], *overrides]) == 0, capsys.readouterr().err


def test_the_config_cell_builds_a_valid_config():
    cell = next(c for c in CODE if "with_field" in c)
    namespace = {}
    exec(cell, namespace)
    config = validate(namespace["config"])
    assert config["data"]["source"] == "tfds" and config["epochs"] == 5 and config["seeds"] == 4
