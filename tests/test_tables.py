"""How notebooks show tables: formats per column, fixed HTML ids, verdicts coloured by kind."""

import pandas as pd
import pytest

from turbosparse_lib import tables
from turbosparse_lib.paper import claims


def test_styled_formats_columns_and_writes_the_same_html_twice():
    df = pd.DataFrame({"model": ["a", "b"], "zeros": [0.81234, 0.5], "ppl": [1234.567, 20.0]})
    html = tables.styled(df, {"zeros": "{:.1%}"}, caption="ours").to_html()
    assert "81.2%" in html and "1.23e+03" in html and "<caption>ours</caption>" in html
    assert html == tables.styled(df, {"zeros": "{:.1%}"}, caption="ours").to_html()  # reruns diff cleanly
    assert df.zeros.iloc[0] == 0.81234  # the data is not rounded, only shown so
    with pytest.raises(KeyError, match="lacks"):
        tables.styled(df, {"recall": "{:.2f}"})


def test_claims_summary_colours_every_verdict_by_its_kind():
    rows = [
        {c: "x" for c in ("claim", "where", "paper", "ours", "setting", "why")} | {"verdict": v}
        for v in claims.VERDICTS
    ]
    html = tables.claims_summary(pd.DataFrame(rows)).to_html()
    for v in claims.VERDICTS:
        assert tables.VERDICT_COLOURS[v] in html
    assert set(tables.VERDICT_COLOURS) == set(claims.VERDICTS)
    with pytest.raises(ValueError, match="unknown verdict"):
        tables.verdict_colour("maybe")
    with pytest.raises(KeyError, match="not a claims table"):
        tables.claims_summary(pd.DataFrame({"claim": ["x"]}))


def test_targets_summary_judges_each_value_by_its_target_and_refuses_an_unknown_key():
    from turbosparse_lib.paper.targets import get_target

    ratio = get_target("relufied_ppl_ratio")  # <= threshold
    zeros = get_target("relufied_zero_fraction")  # >= threshold
    table = tables.targets_summary(
        {
            "relufied_ppl_ratio": (ratio.threshold + 0.5, "too high"),
            "relufied_zero_fraction": (zeros.threshold, "on it"),
        }
    )
    data = table.data.set_index("note")
    assert data.loc["too high", "met"] == "missed" and data.loc["on it", "met"] == "met"
    assert data.loc["too high", "threshold"] == f"<= {ratio.threshold:g}"
    html = table.to_html()
    assert tables.MET_COLOURS[True] in html and tables.MET_COLOURS[False] in html
    with pytest.raises(KeyError, match="no target"):
        tables.targets_summary({"speed_of_light": (1.0, "")})


def test_targets_summary_takes_rows_where_one_target_is_measured_per_format():
    from turbosparse_lib.paper.targets import get_target

    t = get_target("gemv_of_bandwidth")  # >= threshold
    table = tables.targets_summary(
        [("gemv_of_bandwidth", t.threshold + 0.01, "f32"), ("gemv_of_bandwidth", 0.1, "q8_0")]
    )
    assert list(table.data.met) == ["met", "missed"] and list(table.data.note) == ["f32", "q8_0"]
