"""``lightning-align report``: the HTML page rendered from real runs' event files.

Runs are made through the CLI itself (so ``config.yaml`` and ``hparams.yaml`` sit next to the events):
a quickstart-like run (MLP on digits, three measurement callbacks), the same at another width, and a
run with a single callback. Oracles: the page parses, holds its tables (the first -> last table with the
suite's headline labels, the hyper-parameters, the config), and every image decodes to a non-blank PNG
identical to the file written next to the page.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from unittest import mock

import pytest

from lightning_align import cli
from lightning_align.report import load_runs, write_report

pytestmark = pytest.mark.slow  # three small fits and six renders: about 20-30 s on 2 shared CPU cores

QUICK = """
seed_everything: 0
trainer:
  max_steps: 8
  accelerator: cpu
  log_every_n_steps: 2
  val_check_interval: 4
  limit_val_batches: 2
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_align.FeatureAlignment
      init_args: {every_n_steps: 2, probe_size: 32}
    - class_path: lightning_align.EffectiveLR
      init_args: {every_n_steps: 2}
    - class_path: lightning_align.RankMonitor
      init_args: {every_n_steps: 4, probe_size: 32}
    - class_path: lightning_align.AlignSummary
      init_args: {table: false}
model:
  class_path: example_modules.MLP
  init_args: {width: 32, depth: 2, norm: batch, lr: 0.1, momentum: 0.9}
data:
  class_path: example_modules.DigitsDataModule
  init_args: {batch_size: 64}
"""

SINGLE = """
seed_everything: 0
trainer:
  max_steps: 6
  accelerator: cpu
  log_every_n_steps: 2
  limit_val_batches: 0
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_align.Sharpness
      init_args: {every_n_steps: 3, probe_size: 32, max_matvecs: 10}
model:
  class_path: example_modules.MLP
  init_args: {width: 16, depth: 2, optimizer: adam, lr: 0.01}
data:
  class_path: example_modules.DigitsDataModule
  init_args: {batch_size: 64}
"""


def fit(config: str, root: Path, name: str, *extra: str) -> Path:
    """Run ``lightning-align fit`` in this process with a TensorBoard logger writing to ``root/name``."""
    cfg = root / f"{name}.yaml"
    cfg.write_text(config)
    logger = ('{"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": '
              f'{{"save_dir": "{root}", "name": "", "version": "{name}", "default_hp_metric": false}}}}')
    with mock.patch.object(sys, "argv", ["lightning-align"]):
        cli.main(["fit", "--config", str(cfg), f"--trainer.logger={logger}", *extra])
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "quick": fit(QUICK, root, "quick"),
        "wide": fit(QUICK, root, "wide", "--model.init_args.width=64"),
        "single": fit(SINGLE, root, "single"),
    }


class PageParser(HTMLParser):
    """Tables (as lists of rows of cell texts), image sources and the text of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def render(paths: list[Path], out: Path) -> tuple[PageParser, Path]:
    page, _ = write_report(paths, out)
    parser = PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser, page


def check_images(parser: PageParser, out: Path) -> None:
    """Every image is an embedded PNG that decodes, is not blank, and equals a file next to the page."""
    from matplotlib.image import imread

    files = sorted(out.glob("*.png"))
    assert parser.images and len(parser.images) == len(files)
    on_disk = {f.read_bytes() for f in files}
    for src in parser.images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data in on_disk
        pixels = imread(io.BytesIO(data), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels[..., :3].std() > 0.01  # not a blank canvas


def table_with(parser: PageParser, header: str) -> list[list[str]]:
    for table in parser.tables:
        if table and header in table[0]:
            return table
    raise AssertionError(f"no table with a {header!r} column; headers: {[t[0] for t in parser.tables if t]}")


def test_report_of_a_quickstart_like_run(runs: dict[str, Path], tmp_path: Path) -> None:
    parser, page = render([runs["quick"]], tmp_path)
    check_images(parser, tmp_path)
    summary = table_with(parser, "first")
    assert summary[0] == ["family", "quantity", "first", "last", "steps"]
    labels = {row[1] for row in summary[1:]}
    assert {"min cos over layers", "ELR spread (max/min)", "min repr. effective rank", "loss"} <= labels
    hparams = table_with(parser, "hyper-parameter")
    assert ["width", "32"] in [row[:2] for row in hparams]
    text = "".join(parser.text)
    assert "class_path: example_modules.MLP" in text  # the config saved by LightningCLI
    alts = [p.name for p in tmp_path.glob("*.png")]
    for family in ("align_cos", "elr", "rank_repr_effective"):  # a layer x step heatmap per per-layer family
        assert any(f"heatmap-{family}" in a for a in alts), alts
    assert any("spectrum-weights" in a for a in alts)
    assert "<html" in page.read_text()[:200] and "http" not in page.read_text().replace("http-equiv", "")


def test_report_of_a_single_callback_run(runs: dict[str, Path], tmp_path: Path) -> None:
    parser, _ = render([runs["single"]], tmp_path)
    check_images(parser, tmp_path)
    families = {row[0] for row in table_with(parser, "first")[1:]}
    assert "sharpness" in families and not families & {"align", "elr", "rank", "ntk", "coord"}
    assert not list(tmp_path.glob("*heatmap*"))  # no per-layer family, no heatmap


def test_report_compares_two_runs(runs: dict[str, Path], tmp_path: Path) -> None:
    parser, _ = render([runs["quick"], runs["wide"]], tmp_path)
    check_images(parser, tmp_path)
    summary = table_with(parser, "quantity")
    assert summary[0] == ["family", "quantity", "quick", "wide"]
    assert all("→" in cell for row in summary[1:] for cell in row[2:] if cell != "-")
    run_table = table_with(parser, "run")
    assert [row[:2] for row in run_table[1:]] == [["quick", "32"], ["wide", "64"]]  # what differs: the width
    assert len(list(tmp_path.glob("*heatmap-align_cos*"))) == 2  # one heatmap per run


def test_runs_read_back_from_events(runs: dict[str, Path]) -> None:
    (run,) = load_runs([runs["quick"]])
    assert run.last_step >= 7 and "train/loss" in run.scalars and "val/loss" in run.scalars
    assert run.config["model"]["init_args"]["width"] == 32
    assert any(t.startswith("rank/singular_values/") for t in run.histograms)


def test_report_command(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", str(tmp_path / "nothing-here")])
    assert exc.value.code == 2
    cli.main(["report", str(runs["single"]), "--out", str(tmp_path / "r")])
    assert (tmp_path / "r" / "report.html").is_file()
    assert "report:" in capsys.readouterr().out


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
PROBE = ("<script>window.addEventListener('load', () => { const imgs = [...document.images]; const p = document.createElement('pre');"
         " p.id = 'probe'; p.textContent = 'loaded ' + imgs.filter(i => i.complete && i.naturalWidth > 0).length + ' of ' + imgs.length;"
         " document.body.appendChild(p); });</script></body>")


@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium installed (apt-get install chromium)")
def test_report_loads_in_a_headless_browser(runs: dict[str, Path], tmp_path: Path) -> None:
    page, _ = write_report([runs["quick"], runs["wide"]], tmp_path / "r")
    probe = tmp_path / "probe.html"  # the page plus a script counting the images the browser decoded
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE), encoding="utf-8")
    dom = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], check=False, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"loaded (\d+) of (\d+)", dom)
    assert found, dom[-2000:]
    assert int(found.group(1)) == int(found.group(2)) == len(list((tmp_path / "r").glob("*.png"))) > 0
