"""`dynascope report`: one page per run, with the run's own events and a figure section per analysis."""

import html
import re

from helpers import copy_run
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import dynascope
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


def verdicts(page: str) -> dict[str, str]:
    """{paper: the verdict line} of the signatures table."""
    section = page.split("<h2>The papers' signatures</h2>", 1)[1].split("<h2>", 1)[0]
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", section)]
    return {re.sub(r"<.*?>", "", cells[0]): html.unescape(cells[2]) for cells in rows if cells}


def test_the_page_says_whether_the_run_shows_each_signature(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    write_json(RunFiles(run).analysis.summary, {"outliers/emergence_step": 4.0, "frequency/encoded_step": None,
                                                "regions/sharpening_step": None})
    main(["report", str(run)])
    page = (RunFiles(run).report / "index.html").read_text()
    history = RunHistory.load(run)
    score = history.row_at(4)["outliers/score_max"]
    lines = verdicts(page)
    assert lines["Macocco et al. 2025"] == ("This run shows it: outliers/emergence at step 4, where "
                                            f"outliers/score_max (threshold 1) is {score:.3g}.")
    r2 = history.rows[-1]["frequency/r2_corpus"]
    assert lines["Cho et al. 2025"] == (
        f"This run does not show it: frequency/r2_corpus (threshold 0.5) is {r2:.3g} at the last checkpoint, step 7, "
        f"and no onset in its {len(history.rows)} checkpoints.")
    assert "href='https://arxiv.org/abs/2503.21718'" in page and "href='https://arxiv.org/abs/2203.14680'" in page
    assert f"drawn by dynascope {dynascope.__version__}" in page and "<summary>config</summary>" in page
    assert "alt='training_loss'" in page and (RunFiles(run).report / "training_loss.png").stat().st_size > 5000
    wandb_id = RunFiles(run).wandb_id.read_text().strip()
    assert f"wandb run {wandb_id} (offline" in page
    # a run still short of its last step cannot yet show what it has not shown
    config = RunFiles(run).config
    config.write_text(config.read_text().replace("max_steps: 7", "max_steps: 700"))
    RunFiles(run).wandb_url.write_text("https://wandb.ai/team/dynascope/runs/" + wandb_id)
    main(["report", str(run)])
    page = (RunFiles(run).report / "index.html").read_text()
    assert verdicts(page)["Cho et al. 2025"].startswith("This run cannot yet show it: ")
    assert verdicts(page)["Cho et al. 2025"].endswith("short of the run's 700 steps.")
    assert f"<a href='https://wandb.ai/team/dynascope/runs/{wandb_id}'>" in page


def test_one_page_per_run_redrawn_by_analyze(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    index = RunFiles(run).report / "index.html"
    index.parent.mkdir()
    index.write_text("the page of an earlier fit")
    main(["analyze", str(run), "--steps", "0,7", "--redo"])
    assert "The papers' signatures" in index.read_text() and "frequency/dist_to_final" in RunHistory.load(run).rows[-1]
    assert not (RunFiles(run).analysis.root / "report").exists()  # no second page inside analysis/


def test_card_titles_and_line_labels_stay_clear_of_the_panels(tiny_run):
    """Seen in the screenshots before: a card's title on its panels' titles, an event's label cut off at the
    right edge of its panel."""
    from dynascope.pages.report import onset_card, run_events

    history = RunHistory.load(tiny_run)
    plot = RunPlot(history)
    cards = [f for e, j in run_events(history).values() if (f := onset_card(plot, e, j)) is not None]
    assert cards
    for fig in cards:
        renderer = FigureCanvasAgg(fig).get_renderer()
        (title,) = fig.texts  # the suptitle
        for ax in fig.axes:
            assert not title.get_window_extent(renderer).overlaps(ax.title.get_window_extent(renderer)), title
    fig = Figure(figsize=(4, 3))
    ax = fig.add_subplot()
    ax.plot([0, 10], [0, 1])
    last = history.rows[-1]["step"]
    plot.mark(ax, last, "converged")
    plot.finish(ax, "t")
    renderer = FigureCanvasAgg(fig).get_renderer()
    (label,) = ax.texts
    assert ax.get_window_extent(renderer).contains(*label.get_window_extent(renderer).max)
