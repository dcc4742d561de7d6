"""harl_tf.progress: a bar on a terminal, a few whole lines in a log."""
import io

from harl_tf import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_whole_lines_not_one_redraw_per_update():
    log = io.StringIO()
    for _ in progress.progress(range(10_000), desc="masks", unit="img", stream=log):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the first draw and the final state: the updates in between fall inside one interval
    assert len(lines) == 2, lines
    assert lines[0].startswith("masks:") and "0/10000" in lines[0]
    assert "10000/10000" in lines[-1]


def test_a_bar_that_does_not_stay_leaves_no_blank_lines_in_a_log():
    log = io.StringIO()
    for _ in progress.progress(range(100), desc="epoch", leave=False, stream=log):
        pass
    assert all(line.strip() for line in log.getvalue().splitlines())


def test_a_terminal_gets_the_live_bar_redrawn_in_place():
    terminal = _Terminal()
    for _ in progress.progress(range(3), desc="x", stream=terminal, mininterval=0):
        pass
    assert terminal.getvalue().count("\r") >= 3


def test_disabled_shows_nothing():
    log = io.StringIO()
    for _ in progress.progress(range(5), disable=True, stream=log):
        pass
    assert log.getvalue() == ""


def test_keras_fit_prints_a_line_per_epoch_into_a_log_and_a_bar_on_a_terminal():
    assert progress.keras_verbose(1, stream=io.StringIO()) == 2
    assert progress.keras_verbose(1, stream=_Terminal()) == 1
    assert progress.keras_verbose(0, stream=io.StringIO()) == 0  # silence stays silence
