"""The one way training's reports make and save their figures (PNG, headless), and write themselves
out (JSON, Markdown and the chart side by side).

    plt = pyplot()
    fig, ax = plt.subplots()
    ...
    save_figure(fig, "out/report.png")
    paths = write_report_files(report, "out", "name", markdown, plot)   # out/name.{json,md,png}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out `fig`, write it to `path` (creating its folder) and free it; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def write_report_files(report: dict[str, Any], out_dir: str | Path, stem: str, markdown: Callable[[dict], str],
                       plot: Callable[[dict, Path], Any], json_out: str | Path | None = None) -> dict[str, Path]:
    """`out_dir/<stem>.json` (the report), `.md` (`markdown(report)`) and `.png` (`plot(report, path)`),
    and the JSON again at `json_out` when given (a command's `--json OUT`); returns their paths by
    kind ("json", "md", "png", "json_out")."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"{stem}.{kind}" for kind in ("json", "md", "png")}
    text = json.dumps(report, indent=2) + "\n"
    paths["json"].write_text(text)
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    if json_out is not None:
        paths["json_out"] = Path(json_out)
        paths["json_out"].parent.mkdir(parents=True, exist_ok=True)
        paths["json_out"].write_text(text)
    return paths
