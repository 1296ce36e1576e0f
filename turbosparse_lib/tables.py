"""Tables as a notebook shows them: styled DataFrames, and the claims summary a notebook opens with.

A notebook's numbers live in its CSVs; these functions only decide how a reader sees them: numbers rounded per
column, text left-aligned, a caption that says what the table is, and every verdict in the colour of its kind.
``claims_summary`` renders the claims a notebook decides (``paper.claims.claims_table(notebook=...)``), so the
verdict a notebook prints is the one the claims report and the README print.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import pandas as pd

from .paper.targets import get_target

# background of a verdict's cell, by kind (pale, so that the text stays readable in light and dark themes)
VERDICT_COLOURS = {
    "holds": "#d4edda",
    "holds qualitatively": "#fff3cd",
    "does not hold": "#f8d7da",
    "not distinguishable at our scale": "#e2e3e5",
    "not reproduced here": "#e2e3e5",
}

_TABLE_STYLES = [
    {"selector": "caption", "props": "caption-side: top; text-align: left; font-weight: bold; padding-bottom: 4px"},
    {"selector": "th", "props": "text-align: left"},
]


def styled(
    df: pd.DataFrame,
    formats: str | Mapping[str, str] | None = None,
    caption: str | None = None,
    hide_index: bool = False,
):
    """``df`` as a ``Styler``: floats formatted by ``formats`` (one format string for every float column, or one per
    column; default ``{:.3g}``), text left-aligned, a caption above. The data is not changed."""
    floats = [c for c in df.columns if pd.api.types.is_float_dtype(df[c])]
    if formats is None or isinstance(formats, str):
        per_column = {c: formats or "{:.3g}" for c in floats}
    else:
        unknown = set(formats) - set(df.columns)
        if unknown:
            raise KeyError(f"formats for columns the table lacks: {sorted(unknown)}; it has {list(df.columns)}")
        per_column = {**{c: "{:.3g}" for c in floats}, **formats}
    # a fixed id (random by default) so that a rerun writes the same HTML into the notebook
    uid = hashlib.sha1(f"{caption}|{list(df.columns)}|{df.shape}".encode()).hexdigest()[:8]
    s = df.style.format(per_column, na_rep="-").set_table_styles(_TABLE_STYLES).set_uuid(uid)
    text = [c for c in df.columns if df[c].dtype == object]
    if text:
        s = s.set_properties(subset=text, **{"text-align": "left"})
    if caption:
        s = s.set_caption(caption)
    return s.hide(axis="index") if hide_index else s


def verdict_colour(verdict: str) -> str:
    """The CSS of a verdict's cell (an unknown verdict raises: every verdict is one of the claims report's)."""
    if verdict not in VERDICT_COLOURS:
        raise ValueError(f"unknown verdict {verdict!r}; verdicts are {', '.join(VERDICT_COLOURS)}")
    return f"background-color: {VERDICT_COLOURS[verdict]}"


def claims_summary(claims: pd.DataFrame, caption: str = "The paper's claims, and ours", notebook: bool = False):
    """The claims a notebook decides as a styled table: where in the paper, the paper's number, ours, our setting,
    the verdict (coloured by kind) and why; ``notebook``: also the notebook that decides each claim."""
    cols = ["claim", "where", "paper", "ours", "setting", "verdict", "why"] + (["notebook"] if notebook else [])
    missing = [c for c in cols if c not in claims.columns]
    if missing:
        raise KeyError(f"not a claims table (from paper.claims.claims_table): it lacks {missing}")
    table = claims[cols].rename(columns={"paper": "the paper", "ours": "ours (this run)"})
    return styled(table, caption=caption, hide_index=True).map(verdict_colour, subset=["verdict"])


MET_COLOURS = {True: VERDICT_COLOURS["holds"], False: VERDICT_COLOURS["does not hold"]}


def targets_summary(
    measured: Mapping[str, tuple[float, str]] | Iterable[tuple[str, float, str]],
    caption: str = "Our targets (not the paper's)",
):
    """This companion's targets (``paper.targets``) beside the measured values, as a styled table: what each target
    measures, its threshold, ours, met or missed (coloured), and a note. ``measured``: target key -> (value, note),
    or (key, value, note) rows where one target is measured several times (once per format, say); each value is
    judged by ``Target.met``, the same rule ``paper.targets.check`` prints."""
    items = [(k, *v) for k, v in measured.items()] if isinstance(measured, Mapping) else list(measured)
    rows = []
    for key, value, note in items:
        t = get_target(key)
        rows.append(
            {
                "our target": t.what,
                "threshold": f"{t.direction} {t.threshold:g}",
                "ours": float(value),
                "met": "met" if t.met(value) else "missed",
                "note": note,
            }
        )
    table = pd.DataFrame(rows)
    colour = {"met": f"background-color: {MET_COLOURS[True]}", "missed": f"background-color: {MET_COLOURS[False]}"}
    return styled(table, {"ours": "{:.4g}"}, caption=caption, hide_index=True).map(colour.get, subset=["met"])
