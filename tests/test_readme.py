"""Every fenced code block of README.md and docs/*.md runs as written, and every relative link resolves.

Each block must carry a language tag, and each language is handled deliberately (a new kind of block fails
until this file learns it):

- ``python``: executed in a fresh namespace, in a temporary working folder, one torch thread;
- ``yaml``: a whole or partial LightningCLI config, run in-process by ``lightning_align.cli.build_cli`` for
  3 optimizer steps; a partial one (no ``model``/``data``) gets the quickstart's model (narrower) and data;
- ``bash``: every line must be a known kind of command: ``./run`` with one of its sub-commands,
  ``lightning-align fit --config configs/X.yaml`` (the file exists; ``tests/test_configs.py`` runs every
  config), ``lightning-align report|sweep`` (listed by ``lightning-align --help``, else skipped),
  ``pip install`` (extras exist), ``tensorboard --logdir``, ``pytest``, and
  ``python benchmarks/X.py`` / ``python reproductions/X.py`` (the script exists and ``--help`` exits 0);
- ``text``: tables, trees and other non-code, skipped.

Identical blocks (a snippet shown in the README and again in a docs page) run once.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = ("python", "yaml", "bash", "text")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    body: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    return [
        Block(page, text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2))
        for m in FENCE.finditer(text)
    ]


ALL_BLOCKS = [b for page in PAGES for b in code_blocks(page)]


def unique(lang: str) -> list[Block]:
    seen: set[str] = set()
    out = []
    for b in ALL_BLOCKS:
        if b.lang == lang and b.body not in seen:
            seen.add(b.body)
            out.append(b)
    return out


def params(blocks: list[Block], slow: bool = False) -> list:
    return [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if slow else []) for b in blocks]


def test_every_block_has_a_known_language() -> None:
    assert ALL_BLOCKS, "no code blocks found"
    unknown = [f"{b.id} ({b.lang or 'untagged'})" for b in ALL_BLOCKS if b.lang not in LANGUAGES]
    assert not unknown, (
        f"code blocks of a language this test does not run: {unknown}; tag tables and trees `text`, "
        f"or teach tests/test_readme.py to run the new kind ({', '.join(LANGUAGES)} are known)"
    )


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < 450, f"README.md has {lines} lines: move reference material to docs/ and link it"


# --------------------------------------------------------------------------------------------------- python
def _runs_a_fit(b: Block) -> bool:
    return "Trainer(" in b.body


@pytest.mark.parametrize(
    "block", params([b for b in unique("python") if not _runs_a_fit(b)])
    + params([b for b in unique("python") if _runs_a_fit(b)], slow=True)
)
def test_python_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a Trainer's lightning_logs land here
    torch.set_num_threads(1)
    code = compile(block.body, block.id, "exec")
    exec(code, {"__name__": "__main__"})  # noqa: S102  (the README's own code)


# ----------------------------------------------------------------------------------------------------- yaml
CLI_KEYS = {"seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path"}


def base_config() -> dict:
    """The quickstart's model (narrower) and data, without callbacks: what a partial snippet is added to."""
    quickstart = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    model = quickstart["model"]
    model["init_args"]["width"] = 32
    return {"seed_everything": 0, "trainer": {"accelerator": "cpu"}, "model": model, "data": quickstart["data"]}


def merged(snippet: dict) -> dict:
    config = base_config()
    for key, value in snippet.items():
        if key == "trainer":
            config["trainer"].update(value)
        else:
            config[key] = value  # a snippet's model or data replaces the base's whole
    return config


def _class_paths(config: dict) -> list[str]:
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return [c["class_path"] for c in callbacks]


@pytest.mark.parametrize("block", params(unique("yaml"), slow=True))
def test_yaml_block_runs_in_the_cli(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_align.callbacks import MeasurementCallback
    from lightning_align.cli import build_cli

    snippet = yaml.safe_load(block.body)
    assert isinstance(snippet, dict) and snippet, f"{block.id}: not a YAML mapping"
    assert set(snippet) <= CLI_KEYS, f"{block.id}: keys {sorted(set(snippet) - CLI_KEYS)} are not LightningCLI config keys"
    config = merged(snippet)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    cli = build_cli(
        [
            "fit",
            "--config",
            str(path),
            "--trainer.max_steps=3",
            "--trainer.max_epochs=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == 3
    attached = {f"{type(c).__module__}.{type(c).__qualname__}": c for c in cli.trainer.callbacks}
    for class_path in _class_paths(snippet):
        name = class_path.rsplit(".", 1)[-1]
        found = [c for path_, c in attached.items() if path_.rsplit(".", 1)[-1] == name]
        assert found, f"{block.id}: {class_path} is not among the trainer's callbacks {sorted(attached)}"
        for cb in found:
            if isinstance(cb, MeasurementCallback):
                assert cb.last_step >= 0, f"{block.id}: {name} never measured"


# ----------------------------------------------------------------------------------------------------- bash
def bash_lines() -> list:
    seen: set[str] = set()
    out = []
    for b in unique("bash"):
        for offset, raw in enumerate(b.body.splitlines(), start=1):
            line = raw.strip()
            if line and not line.startswith("#") and line not in seen:
                seen.add(line)
                out.append(pytest.param(b, line, id=f"{b.page.relative_to(ROOT)}:{b.line + offset}"))
    return out


def run_subcommands() -> set[str]:
    """The sub-commands of ./run (its `case` labels)."""
    return set(re.findall(r"^  ([a-z]+)\)$", (ROOT / "run").read_text(encoding="utf-8"), flags=re.MULTILINE))


def extras() -> set[str]:
    """The extras of pyproject.toml (``[project.optional-dependencies]``)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10: the section's `name = [` lines
        section = text.split("[project.optional-dependencies]", 1)[-1].split("\n[", 1)[0]
        return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.MULTILINE))
    return set(tomllib.loads(text)["project"].get("optional-dependencies", {}))


def cli_help(args: list[str]) -> tuple[int, str]:
    from lightning_align.cli import main

    out = io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code
    return (0 if code is None else code), out.getvalue()


def script_help(script: Path) -> tuple[int | str | None, str]:
    """Run ``python SCRIPT --help`` in this process (the heavy imports are loaded already)."""
    source = script.read_text(encoding="utf-8")
    assert "argparse" in source or "parse_args(" in source, (
        f"{script.relative_to(ROOT)} has no command-line parser, so `--help` would run it: give it argparse"
    )
    out = io.StringIO()
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(script), "--help"]
    sys.path.insert(0, str(script.parent))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                runpy.run_path(str(script), run_name="__main__")
                code: int | str | None = "returned without exiting"
            except SystemExit as exc:
                code = exc.code
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return code, out.getvalue()


@pytest.mark.parametrize("block,line", bash_lines())
def test_bash_line_is_a_known_command(block: Block, line: str) -> None:
    words = shlex.split(line)
    where = f"{block.id}: `{line}`"
    if words[0] == "./run":
        assert len(words) >= 2 and words[1] in run_subcommands(), f"{where}: ./run has {sorted(run_subcommands())}"
    elif words[:2] == ["lightning-align", "fit"]:
        assert "--config" in words, f"{where}: give the config (`--config configs/X.yaml`)"
        config = ROOT / words[words.index("--config") + 1]
        assert config.is_file(), f"{where}: no such config"
        assert config.parent == ROOT / "configs", f"{where}: configs live in configs/ (tests/test_configs.py runs them)"
    elif words[0] == "lightning-align" and len(words) > 1 and words[1] in ("report", "sweep"):
        code, text = cli_help(["--help"])
        if not re.search(rf"\b{words[1]}\b", text):
            pytest.skip(f"`lightning-align {words[1]}` is not listed by `lightning-align --help` yet")
        code, text = cli_help([words[1], "--help"])
        assert code == 0, f"{where}: `lightning-align {words[1]} --help` exited {code}:\n{text[-2000:]}"
    elif words[:2] == ["pip", "install"]:
        for word in words[2:]:
            m = re.fullmatch(r"\.\[([\w,-]+)\]", word)
            if m:
                missing = set(m.group(1).split(",")) - extras()
                assert not missing, f"{where}: pyproject.toml has no extras {sorted(missing)}"
    elif words[0] == "tensorboard":
        assert "--logdir" in words, f"{where}: tensorboard needs --logdir"
    elif words == ["pytest"] or words[0] == "pytest" and all(w.startswith("-") or "/" in w for w in words[1:]):
        pass
    elif words[0] == "python" and len(words) > 1 and words[1].split("/")[0] in ("benchmarks", "reproductions"):
        script = ROOT / words[1]
        assert script.is_file(), f"{where}: no such script"
        code, text = script_help(script)
        assert code == 0 and "usage" in text.lower(), f"{where}: `--help` gave {code!r}:\n{text[-2000:]}"
    else:
        pytest.fail(f"{where}: not a kind of command tests/test_readme.py knows how to check; teach it")


# ---------------------------------------------------------------------------------------------------- links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading in {file.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
            path = target.partition("#")[0]
            if path.endswith(".md") and not re.match(r"[a-z]+:", path):
                file = (page.parent / path).resolve()
                if file.is_file():
                    todo.append(file)
    orphans = [str(p.relative_to(ROOT)) for p in PAGES if p.resolve() not in reached]
    assert not orphans, f"docs pages no link leads to from README.md: {orphans}"
