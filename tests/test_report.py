"""`dynascope report`: one page per run, with the run's own events and a figure section per analysis."""

import re

import matplotlib.pyplot as plt
from conftest import copy_run

from dynascope.analysis.plots import changes
from dynascope.analysis.report import figure_row
from dynascope.cli import main
from dynascope.io import write_json


def test_report_page_of_a_run(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    write_json(run / "summary.json", {"outliers/emergence_step": 4.0, "outliers/emergence_revisions": 1.0,
                                      "frequency/converged_step": None, "frequency/converged_revisions": 2.0})
    main(["report", str(run)])
    index = run / "analysis" / "report" / "index.html"
    assert str(index) in capsys.readouterr().out
    page = index.read_text()
    for title in ("000 · Outlier dimensions", "001 · Frequency", "002 · ReLU sparsity", "003 · Stable regions",
                  "004 · FFN sub-updates"):
        assert title in page
    events = dict(re.findall(r"<tr><td>([^<]*)</td><td>([^<]*</td><td>[^<]*</td><td>[^<]*)</td></tr>", page))
    assert events["outliers/emergence_step"] == "4</td><td>512</td><td>1"  # step, tokens seen (4 × 4 × 32), revisions
    assert events["frequency/converged_step"] == "none (revised away)</td><td>—</td><td>2"
    images = page.count("data:image/png;base64,")
    assert images == len(list(index.parent.glob("*.png"))) >= 5


def test_panels_that_never_change_are_left_out():
    assert changes([0.1, 0.2]) and not changes([0.5, 0.5, 0.5]) and not changes([1.0])

    def drawn(ax):
        ax.plot([0, 1], [0, 1])
        return True

    fig = figure_row([drawn, lambda ax: False, drawn])
    assert len(fig.axes) == 2
    plt.close(fig)
    assert figure_row([lambda ax: False]) is None
