"""`dynascope report`: one page per run, with the run's own events and a figure section per analysis."""

import html
import re

from helpers import copy_run
from matplotlib.figure import Figure

from dynascope.analysis import REGISTRY
from dynascope.analysis.figures import RunPlot, changes
from dynascope.cli import main
from dynascope.core.io import write_json
from dynascope.core.records import RunHistory
from dynascope.core.runfiles import RunFiles


def test_report_page_of_a_run(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    write_json(RunFiles(run).analysis.summary, {"outliers/emergence_step": 4.0, "outliers/emergence_revisions": 1.0,
                                      "frequency/converged_step": None, "frequency/converged_revisions": 2.0})
    main(["report", str(run)])
    index = RunFiles(run).report / "index.html"
    assert str(index) in capsys.readouterr().out
    page = index.read_text()
    for name in REGISTRY:  # a section per analysis, in registry order, with its title and paper
        assert f"<h2>{REGISTRY[name].title}</h2>" in page, name
        assert html.escape(REGISTRY[name].paper) in page
    assert [page.index(f"<h2>{REGISTRY[n].title}</h2>") for n in REGISTRY] == sorted(
        page.index(f"<h2>{REGISTRY[n].title}</h2>") for n in REGISTRY)
    events = {cells[0]: cells[1:] for cells in (re.findall(r"<td>(.*?)</td>", row)
                                                for row in re.findall(r"<tr>(.*?)</tr>", page)) if cells}
    assert events["outliers/emergence"][:2] == ["4", "512"]  # the step and the tokens seen (4 × 4 × 32)
    assert events["outliers/emergence"][-2] == "1" and events["frequency/converged"][:2] == ["none", "—"]
    images = page.count("data:image/png;base64,")
    assert images == len(list(index.parent.glob("*.png"))) >= 6
    # the tiny run judges death three times: those panels are left out, and the sparsity section says so
    notes = re.findall(r"<p class='note'>Left out: (.*?)</p>", page)
    assert any("“dead units (judged on the training stream)”: measured at 3 checkpoints only" in n for n in notes)


def test_panels_that_never_change_or_have_too_few_points_are_left_out(tiny_run):
    assert changes([0.1, 0.2]) and not changes([0.5, 0.5, 0.5]) and not changes([1.0])

    def drawn(ax):
        ax.plot([0, 1], [0, 1])
        return True

    plot = RunPlot(RunHistory.load(tiny_run))
    assert plot.empty("t", [([0, 1, 2], [0.1, 0.2, 0.3])]) == "“t”: measured at 3 checkpoints only"
    assert plot.empty("t", [([0, 1, 2, 4], [1.0, 1.0, 1.0, 1.0])]) == "“t”: the same value at every checkpoint"
    assert plot.empty("t", [([0, 1, 2, 4], [0.1, 0.2, 0.3, 0.4]), ([], [])]) is None

    fig = RunPlot.row([drawn, lambda ax: False, drawn])
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert RunPlot.row([lambda ax: False]) is None
