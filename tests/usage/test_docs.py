"""The documentation's commands, run as written on the bundled example: docs/ci.md's GitHub Actions compress
step (its shell script, with the example in place of ``models/lstm.pt``), docs/getting-started.md's useful
variations, and the wheel that docs/ci.md installs from a checkout of the repository."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import EXAMPLE_LSTM, ROOT

DOCS = ROOT / "docs"
KCOMPRESS = pathlib.Path(sys.executable).with_name("kcompress")


def _environment() -> dict[str, str]:
    """The test's interpreter and its ``kcompress`` first on PATH, kcompress importable from this checkout."""
    return {**os.environ, "PATH": f"{KCOMPRESS.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}


def _step_script(workflow: str, name: str) -> str:
    """The ``run: |`` script of the workflow step called ``name``, unindented."""
    step = workflow.split(f"- name: {name}", 1)[1]
    lines = step.split("run: |", 1)[1].splitlines()[1:]
    indent = len(lines[0]) - len(lines[0].lstrip())
    body = []
    for line in lines:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        body.append(line[indent:])
    return "\n".join(body)


@pytest.mark.slow
def test_the_ci_recipe_runs_on_the_bundled_example(tmp_path: pathlib.Path) -> None:
    workflow = re.search(r"```yaml\n(.*?)```", (DOCS / "ci.md").read_text(), re.S).group(1)
    (tmp_path / "models").mkdir()
    (tmp_path / "build").mkdir()
    shutil.copy(EXAMPLE_LSTM, tmp_path / "models" / "lstm.pt")
    outputs, summary = tmp_path / "github_output", tmp_path / "step_summary"
    env = {**_environment(), "GITHUB_OUTPUT": str(outputs), "GITHUB_STEP_SUMMARY": str(summary)}
    compress = subprocess.run(["bash", "-c", _step_script(workflow, "Compress within a 1-point accuracy budget")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert compress.returncode == 0, compress.stderr
    code = int(re.search(r"code=(\d+)", outputs.read_text()).group(1))
    assert code in (0, 3), compress.stderr
    assert {p.name for p in (tmp_path / "build").iterdir()} == {"lstm.kcp-r8.safetensors", "report.json", "report.md"}
    assert "kcompress: kcp" in summary.read_text()
    if code == 3:
        enforce = subprocess.run(["bash", "-c", _step_script(workflow, "Enforce the budget")], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=60)
        assert enforce.returncode == 1 and "'passed': False" in enforce.stdout, enforce.stdout + enforce.stderr


def _getting_started_variations() -> list[str]:
    text = (DOCS / "getting-started.md").read_text()
    block = re.search(r"Useful variations.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("kcompress ")]


@pytest.mark.slow
@pytest.mark.parametrize("command", _getting_started_variations())
def test_getting_started_variations_run(tmp_path: pathlib.Path, command: str) -> None:
    shutil.copy(EXAMPLE_LSTM, tmp_path / "lstm.pt")
    arguments = shlex.split(command)[1:]
    if arguments[0] == "sweep":  # the same command on fewer ranks and formats: each trial is a fit
        arguments = [a for a in arguments if a not in ("1,2,4,8,16", "kcp,tt,ht,svd")]
        arguments[arguments.index("--ranks") + 1:arguments.index("--ranks") + 1] = ["2"]
        arguments[arguments.index("--formats") + 1:arguments.index("--formats") + 1] = ["kcp,svd"]
    result = subprocess.run([str(KCOMPRESS), *arguments], cwd=tmp_path, env=_environment(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_wheel_builds_from_the_repository(tmp_path: pathlib.Path) -> None:
    """docs/ci.md installs kcompress from its repository (it is on no package index): the wheel builds offline
    and holds the package with its data."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=600, capture_output=True)
    (wheel,) = tmp_path.glob("kcompress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("kcompress/cli/main.py", "kcompress/py.typed", "kcompress/datasets/JapaneseVowels_TEST.ts.gz"):
        assert name in names
