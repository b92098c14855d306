"""The front door: the README opens with two commands (`./run quickstart`, `./run test`), `.ci/run` runs exactly
those, and `./run` sets up its virtual environment once and then reuses it.

The set-up logic is checked against a fake virtual environment whose `bin/python`, `bin/lightning-align` and
`bin/pytest` are stub scripts that record their calls, so nothing is installed and no job really runs (each
check takes milliseconds). `.ci/run` itself starts from a fresh clone and passes through both real commands.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "run"

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or shutil.which("sh") is None, reason="./run is a POSIX sh script"
)


# --------------------------------------------------------------------------------------------- the two commands
def readme_code_blocks() -> list[tuple[str, list[str]]]:
    """(language, non-empty lines) of each fenced code block in README.md, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return [(lang, [ln.strip() for ln in body.splitlines() if ln.strip()]) for lang, body in blocks]


def readme_commands() -> list[str]:
    """The README's first two code blocks, each of which must be one bash command."""
    first_two = readme_code_blocks()[:2]
    assert len(first_two) == 2, "README.md should open with two code blocks"
    commands = []
    for lang, lines in first_two:
        assert lang == "bash", f"the README's opening commands should be bash blocks, got {lang!r}"
        assert len(lines) == 1, f"each opening block should be one command, got {lines}"
        commands.append(lines[0])
    return commands


# `./run ARGS` or `"$repo/run" ARGS`, up to the end of the shell command
RUN_CALL = re.compile(r'(?:^|[\s(;&|])(?:\./run|"\$repo/run"|"\$repo"/run|\$repo/run)((?:[ \t]+[^\s);&|]+)*)')


def ci_commands() -> list[str]:
    """Every invocation of the front-door script in .ci/run, spelled as from the repository root."""
    found = []
    for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines():
        code = line.strip()
        if not code or code.startswith(("#", "echo ")):
            continue
        for m in RUN_CALL.finditer(code):
            found.append("./run" + m.group(1).rstrip())
    return found


def test_readme_opens_with_the_two_front_door_commands():
    assert readme_commands() == ["./run quickstart", "./run test"]


def test_ci_runs_exactly_the_readme_commands():
    quickstart, tests = readme_commands()
    # CI adds only the flag that keeps its log readable; everything else is the README's command as written.
    assert ci_commands() == [f"{quickstart} --trainer.enable_progress_bar=false", tests]


def test_ci_does_not_bypass_the_front_door():
    """CI installs and runs nothing itself: the set-up is ./run's, as a new user gets it."""
    code = [
        ln
        for ln in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.lstrip().startswith(("#", "echo "))
    ]
    for ln in code:
        assert not re.search(r"\bpip\b|\bpytest\b|lightning-align\s+fit|activate", ln), ln


def test_run_script_is_posix_sh_and_executable():
    assert RUN.read_text(encoding="utf-8").startswith("#!/bin/sh\n")
    assert os.access(RUN, os.X_OK), "./run must be executable (git mode 100755)"
    subprocess.run(["sh", "-n", str(RUN)], check=True)


def test_venv_is_git_ignored():
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert ".venv/" in ignored or "/.venv/" in ignored or ".venv" in ignored


# ------------------------------------------------------------------------------ set-up logic, with stub commands
STUB = """#!/bin/sh
printf '%s\\t%s\\t%s\\n' "{name}" "$(pwd -P)" "$*" >>"$FRONT_DOOR_LOG"
if [ "$1" = -c ]; then echo "${{STUB_PYTHON_VERSION:-3.11}}"; fi
if [ "$1" = fit ]; then mkdir -p lightning_logs/version_0; fi
"""

# A stand-in for python3: `-m venv DIR` makes DIR a fake venv of stubs; `-c ...` prints the version.
FAKE_PYTHON3 = """#!/bin/sh
printf '%s\\t%s\\t%s\\n' python3 "$(pwd -P)" "$*" >>"$FRONT_DOOR_LOG"
if [ "$1" = -c ]; then echo "${{STUB_PYTHON_VERSION:-3.11}}"; exit 0; fi
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin"
  for name in python lightning-align pytest; do
    cp "{stubs}/$name" "$3/bin/$name"
  done
fi
"""


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def clone(tmp_path):
    """A copy of the front door (./run and pyproject.toml) and a maker of fake venvs, with a shared call log."""
    repo = tmp_path / "clone"
    repo.mkdir()
    shutil.copy2(RUN, repo / "run")
    shutil.copy2(ROOT / "pyproject.toml", repo / "pyproject.toml")
    stubs = tmp_path / "stubs"
    for name in ("python", "lightning-align", "pytest"):
        write_exe(stubs / name, STUB.format(name=name))
    python3 = write_exe(tmp_path / "fake-python3", FAKE_PYTHON3.format(stubs=stubs))
    log = tmp_path / "calls.log"

    class Clone:
        path = repo

        def fake_venv(self, name="venv") -> Path:
            venv = tmp_path / name
            for stub in stubs.iterdir():
                write_exe(venv / "bin" / stub.name, stub.read_text())
            return venv

        def run(self, *args, venv=None, cwd=None, **env):
            log.write_text("")
            full_env = {**os.environ, "FRONT_DOOR_LOG": str(log), "PYTHON": str(python3), **env}
            full_env.pop("VENV", None)
            if venv is not None:
                full_env["VENV"] = str(venv)
            proc = subprocess.run(
                ["sh", str(repo / "run"), *args],
                check=False,
                cwd=cwd or repo,
                env=full_env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            calls = [tuple(ln.split("\t")) for ln in log.read_text().splitlines()]
            return proc, calls

    return Clone()


def pip_calls(calls):
    return [c for c in calls if c[0] == "python" and c[2].startswith("-m pip")]


def test_second_run_with_unchanged_pyproject_skips_pip(clone):
    venv = clone.fake_venv()
    proc, calls = clone.run("quickstart", "--trainer.max_epochs=1", venv=venv)
    assert proc.returncode == 0, proc.stderr
    assert [c[2] for c in pip_calls(calls)] == ["-m pip install -e .[dev]"]
    assert all(c[1] == str(clone.path.resolve()) for c in pip_calls(calls)), "pip must run in the clone"
    assert "pip install -e" in proc.stderr  # says what it is doing
    job, report = calls[-2], calls[-1]
    assert job[0] == "lightning-align"
    assert job[2] == f"fit --config {clone.path.resolve()}/configs/quickstart.yaml --trainer.max_epochs=1"
    assert report[0] == "lightning-align" and report[2] == "report lightning_logs/version_0"  # then the HTML report

    for command, jobs in (("quickstart", ["lightning-align", "lightning-align"]), ("test", ["pytest"])):
        proc, calls = clone.run(command, venv=venv)
        assert proc.returncode == 0, proc.stderr
        assert [c[0] for c in calls] == jobs, f"a second run should go straight to the job: {calls}"
        assert "install" not in proc.stderr


def test_changed_pyproject_reinstalls(clone):
    venv = clone.fake_venv()
    assert clone.run("setup", venv=venv)[0].returncode == 0
    assert pip_calls(clone.run("setup", venv=venv)[1]) == []
    with open(clone.path / "pyproject.toml", "a", encoding="utf-8") as f:
        f.write("\n# a new dependency would go here\n")
    proc, calls = clone.run("setup", venv=venv)
    assert proc.returncode == 0, proc.stderr
    assert len(pip_calls(calls)) == 1
    assert "changed since the last install" in proc.stderr
    assert pip_calls(clone.run("setup", venv=venv)[1]) == []


def test_venv_installed_from_another_clone_reinstalls(clone, tmp_path):
    """An editable install points at one clone's files: a venv shared with another clone (CI's cache) is
    re-pointed at this one."""
    venv = clone.fake_venv()
    assert clone.run("setup", venv=venv)[0].returncode == 0
    other = tmp_path / "other-clone"
    shutil.copytree(clone.path, other)
    proc = subprocess.run(
        ["sh", str(other / "run"), "setup"],
        check=False,
        env={**os.environ, "VENV": str(venv), "FRONT_DOOR_LOG": str(tmp_path / "other.log")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "-m pip install -e .[dev]" in (tmp_path / "other.log").read_text()


def test_fresh_clone_creates_the_default_venv_then_reuses_it(clone):
    proc, calls = clone.run("test", "-k", "front_door")
    assert proc.returncode == 0, proc.stderr
    venv = clone.path / ".venv"
    assert [c[2] for c in calls if c[0] == "python3"][-1] == f"-m venv {venv.resolve()}"
    assert [c[2] for c in pip_calls(calls)] == ["-m pip install --quiet --upgrade pip", "-m pip install -e .[dev]"]
    assert "creating the virtual environment" in proc.stderr
    # pytest runs from the repository root, with the venv first on PATH as if activated
    assert calls[-1] == ("pytest", str(clone.path.resolve()), "-k front_door")

    proc, calls = clone.run("test", cwd=clone.path.parent)
    assert proc.returncode == 0, proc.stderr
    assert [c[0] for c in calls] == ["pytest"]
    assert calls[0][1] == str(clone.path.resolve())


def test_quickstart_runs_in_the_callers_folder(clone, tmp_path):
    """So logs land where the user is (CI runs it in a scratch folder to keep its clone clean)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc, calls = clone.run("quickstart", venv=clone.fake_venv(), cwd=scratch)
    assert proc.returncode == 0, proc.stderr
    assert calls[-1][:2] == ("lightning-align", str(scratch.resolve()))


def test_old_python_is_refused_with_a_clear_message(clone):
    proc, calls = clone.run("quickstart", STUB_PYTHON_VERSION="3.9")
    assert proc.returncode != 0
    assert "needs Python 3.10 or newer" in proc.stderr and "Python 3.9" in proc.stderr
    assert not (clone.path / ".venv").exists()
    assert [c[0] for c in calls] == ["python3"]  # asked its version, nothing else


def test_missing_python_is_reported(clone):
    proc, _ = clone.run("test", PYTHON="no-such-python3.99")
    assert proc.returncode != 0
    assert "not found on PATH" in proc.stderr


def test_a_folder_that_is_not_a_venv_is_left_alone(clone, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    proc, calls = clone.run("test", venv=precious)
    assert proc.returncode != 0
    assert "is not a virtual environment" in proc.stderr
    assert (precious / "notes.txt").read_text() == "keep me"
    assert calls == []


def test_failed_install_is_retried_next_time(clone):
    venv = clone.fake_venv()
    write_exe(venv / "bin" / "python", STUB.format(name="python") + 'case "$*" in *"pip install -e"*) exit 1;; esac\n')
    proc, _ = clone.run("quickstart", venv=venv)
    assert proc.returncode != 0
    assert "failed" in proc.stderr
    write_exe(venv / "bin" / "python", STUB.format(name="python"))
    proc, calls = clone.run("quickstart", venv=venv)
    assert proc.returncode == 0, proc.stderr
    assert len(pip_calls(calls)) == 1 and calls[-1][0] == "lightning-align"


def test_job_exit_code_is_passed_through(clone):
    """pytest's exit code 5 (no tests collected) must fail CI, not pass silently."""
    venv = clone.fake_venv()
    write_exe(venv / "bin" / "pytest", STUB.format(name="pytest") + "exit 5\n")
    proc, _ = clone.run("test", venv=venv)
    assert proc.returncode == 5
