"""The learning-curve picture: error bars where a spread is given, and a clear error where it does not fit."""

import pytest

from lfnnify.errors import ConfigError
from lfnnify.plots import plot_curves


def test_curves_with_a_spread_are_saved_with_error_bars(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    errorbar = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, *a, **k: drawn.append(k.get("yerr")) or errorbar(self, *a, **k))
    path = plot_curves({"backprop": [16.0, 12.4, 11.1], "replay": [17.0, 13.6, 11.6]}, tmp_path / "c.png",
                       spread={"replay": [0.7, 0.9, 0.1]}, title="a title long enough to be wrapped " * 3)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert drawn == [None, [0.7, 0.9, 0.1]]  # backprop without bars, replay with its own


@pytest.mark.parametrize("spread", [{"replay": [0.1, 0.2]}, {"bp": [0.1, 0.2, 0.3]}])
def test_a_spread_that_does_not_fit_its_series_is_refused(tmp_path, spread):
    with pytest.raises(ConfigError, match=r"spread\[.*\] has \d values, but the series of that name has \d: give one"):
        plot_curves({"replay": [17.0, 13.6, 11.6]}, tmp_path / "c.png", spread=spread)
    assert not (tmp_path / "c.png").exists()
