"""Altair (Vega-Lite) charts: lines with bands, scatter with error bars, heatmaps.

Colours follow the algorithm (``colours.colour_of``: the same on every page and in every study); the grid
settings of one algorithm differ by dash (lines) or marker (points). Every chart is drawn as SVG (the tests
count its marks) and titles its axes with their units.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from . import colours

LEGEND = alt.Legend(orient="bottom", columns=4, labelLimit=400, symbolOpacity=1)
SVG = {"embedOptions": {"renderer": "svg"}}


def draw(chart, **kwargs):
    """``st.altair_chart`` drawing SVG (its marks are elements a browser test can count)."""
    import streamlit as st

    return st.altair_chart(chart.properties(usermeta=SVG), **kwargs)


def algo_scale(algos) -> alt.Scale:
    """The fixed colour scale of the algorithms in ``algos``."""
    domain, rng = colours.domain_range(algos)
    return alt.Scale(domain=domain, range=rng)


def algo_colour(algos, field: str = "algorithm", legend: bool = True) -> alt.Color:
    return alt.Color(
        field=_q(field),
        type="nominal",
        title="algorithm",
        scale=algo_scale(algos),
        legend=alt.Legend(orient="bottom", columns=6, labelLimit=400, symbolOpacity=1) if legend else None,
    )


def _scale(log: bool) -> alt.Scale:
    return alt.Scale(type="log") if log else alt.Scale(zero=False)


def log_ready(df: pd.DataFrame, cols: list[str], band: tuple[str, str] | None = None) -> tuple[pd.DataFrame, int]:
    """Rows a log scale can draw: those with every column of ``cols`` > 0, and the count dropped.

    ``band``: the columns of a band along the last of ``cols`` (the log axis): an end at or below 0 (a
    non-negative metric's band clipped at 0) is raised to the smallest positive value shown, the bottom of the
    axis, so that the line and the rest of its band still draw.
    """
    ok = np.ones(len(df), dtype=bool)
    for c in cols:
        ok &= (df[c] > 0).to_numpy()
    out = df[ok].copy()
    if band and band[0] in out and len(out):
        lo, hi = band
        pos = pd.concat([out[lo][out[lo] > 0], out[cols[-1]]]) if cols else out[lo][out[lo] > 0]
        floor = float(pos.min()) if len(pos) else 1e-12
        out[lo] = out[lo].where(out[lo] > 0, floor)
        if hi in out:
            out[hi] = out[hi].where(out[hi] > 0, floor)
    return out, int((~ok).sum())


def lines(
    df: pd.DataFrame,
    x: str,
    y_title: str,
    log_x: bool = False,
    log_y: bool = False,
    height: int = 380,
    x_title: str | None = None,
    hover: bool = True,
) -> alt.LayerChart:
    """Mean line per ``line`` with its band (columns ``line``, ``algorithm``, ``variant``, ``mean``, ``lo``,
    ``hi``, ``n``): colour by algorithm, dash by variant; hovering shows every line's value at the nearest x."""
    df = df.copy()
    if "algorithm" not in df:
        df["algorithm"] = df["line"].astype(str)
    if "variant" not in df:
        df["variant"] = ""
    dashed = df["variant"].nunique() > 1
    X = alt.X(field=_q(x), type="quantitative", title=x_title or x, scale=_scale(log_x))
    enc = {"x": X, "color": algo_colour(df["algorithm"]), "detail": alt.Detail("line:N")}
    if dashed:
        enc["strokeDash"] = alt.StrokeDash("variant:N", title="setting", legend=LEGEND)
    base = alt.Chart(df).encode(**enc)
    band = base.mark_area(opacity=0.15).encode(y=alt.Y("lo:Q", title=y_title, scale=_scale(log_y)), y2="hi:Q")
    line = base.mark_line().encode(
        y=alt.Y("mean:Q", title=y_title, scale=_scale(log_y)),
        tooltip=[
            alt.Tooltip("line:N"),
            alt.Tooltip(field=_q(x), type="quantitative", title=x),
            alt.Tooltip("mean:Q", format=".4g"),
            alt.Tooltip("lo:Q", format=".4g"),
            alt.Tooltip("hi:Q", format=".4g"),
            alt.Tooltip("n:Q"),
        ],
    )
    layers = [band, line]
    if hover and len(df):
        layers += _hover(df, x, X, log_y)
    return alt.layer(*layers).properties(height=height)


def _hover(df: pd.DataFrame, x: str, X: alt.X, log_y: bool) -> list:
    """A vertical rule at the x nearest the pointer whose tooltip lists every line's mean there, and dots."""
    near = alt.selection_point(nearest=True, on="pointermove", fields=[x], empty=False, clear="pointerout")
    names = list(dict.fromkeys(df["line"].astype(str)))
    wide = df.pivot_table(index=x, columns="line", values="mean", aggfunc="mean", observed=True).reset_index()
    wide.columns = [str(c) for c in wide.columns]
    tips = [alt.Tooltip(field=_q(x), type="quantitative", title=x)] + [
        alt.Tooltip(field=_q(n), type="quantitative", format=".4g", title=n) for n in names if n in wide
    ]
    rule = (
        alt.Chart(wide)
        .mark_rule(color="gray")
        .encode(x=X, opacity=alt.condition(near, alt.value(0.5), alt.value(0)), tooltip=tips)
        .add_params(near)
    )
    dots = (
        alt.Chart(df)
        .mark_point(filled=True, size=36, opacity=1)
        .encode(x=X, y=alt.Y("mean:Q", scale=_scale(log_y)), color=algo_colour(df["algorithm"], legend=False))
        .transform_filter(near)
    )
    return [rule, dots]


def warm_up_spec() -> dict:
    """The Vega-Lite spec (data inline) of a tiny chart drawn like Compare's: lines, bands, the hover rule and
    dots. The browser draws it off screen once per tab while idle (``ui.preload_frontend``) so that the first
    chart a researcher opens is not the one that pays for compiling Vega's code (~0.5 s of a 2-core machine).
    Kept in ``warm_up_chart.json`` beside this module (the dashboard's first page should not wait for altair);
    a test checks the file is this spec."""
    steps = [0, 1, 2, 3]
    tiny = pd.DataFrame(
        [
            {"step": s, "line": f"{a} beta={b}", "algorithm": a, "variant": f"beta={b}", "mean": m, "lo": m - 0.1,
             "hi": m + 0.1, "n": 3}
            for a, b, k in (("sft", 0.1, 1.0), ("ppo", 0.1, 0.5), ("ppo", 0.3, 0.2))
            for s in steps
            for m in [k * (1 - 0.5**s)]
        ]
    )  # fmt: skip
    chart = lines(tiny, "step", "reward/exact (nats)", x_title="step (update rounds)")
    return chart.properties(usermeta=SVG).to_dict()  # as ``draw`` gives it to Streamlit, the data inline


def small_multiples(long: pd.DataFrame, x: str, algo: str, columns: int = 3, height: int = 220) -> alt.ConcatChart:
    """One line chart per ``metric`` of a long frame (``metric``, ``x``, ``value``), each with its own y axis
    titled with the metric's unit, in the algorithm's colour."""
    out = []
    for metric, g in long.groupby("metric", sort=False):
        out.append(
            alt.Chart(g)
            .mark_line(color=colours.colour_of(algo), point=len(g) < 40)
            .encode(
                x=alt.X(field=_q(x), type="quantitative", title=f"{x} (update rounds)" if x == "step" else x),
                y=alt.Y("value:Q", title=colours.titled(str(metric)), scale=alt.Scale(zero=False)),
                tooltip=[alt.Tooltip(field=_q(x), type="quantitative"), alt.Tooltip("value:Q", format=".4g")],
            )
            .properties(title=str(metric), height=height, width=300)
        )
    return alt.concat(*out, columns=columns)


def scatter(
    df: pd.DataFrame,
    x: str,
    y: str,
    shape: str | None = None,
    log_x: bool = False,
    tooltip: list[str] | None = None,
    height: int = 420,
    x_title: str | None = None,
    y_title: str | None = None,
) -> alt.LayerChart:
    """Points at the means, coloured by ``algorithm``, with error bars from ``<x>:lo``/``<x>:hi`` and
    ``<y>:lo``/``<y>:hi`` when present."""
    base = alt.Chart(df).encode(color=algo_colour(df["algorithm"]))
    marks = (
        {"shape": alt.Shape(field=_q(shape), type="nominal", title=None, legend=alt.Legend(orient="bottom"))}
        if shape
        else {}
    )
    X = alt.X(field=_q(x), type="quantitative", title=x_title or x, scale=_scale(log_x))
    Y = alt.Y(field=_q(y), type="quantitative", title=y_title or y, scale=alt.Scale(zero=False))
    tips = [
        alt.Tooltip(field=_q(c), type="nominal" if df[c].dtype == object else "quantitative", title=c)
        for c in (tooltip or ["method", x, y])
    ]
    pts = base.mark_point(filled=True, size=80, opacity=0.9).encode(x=X, y=Y, tooltip=tips, **marks)
    layers = []
    if f"{x}:lo" in df:
        layers.append(
            base.mark_errorbar(ticks=False).encode(
                x=alt.X(field=_q(x + ":lo"), type="quantitative", scale=_scale(log_x), title=x_title or x),
                x2=alt.X2(field=_q(x + ":hi")),
                y=Y,
            )
        )
    if f"{y}:lo" in df:
        layers.append(
            base.mark_errorbar(ticks=False).encode(
                x=X,
                y=alt.Y(field=_q(y + ":lo"), type="quantitative", title=y_title or y),
                y2=alt.Y2(field=_q(y + ":hi")),
            )
        )
    return alt.layer(*layers, pts).properties(height=height)


def frontier(df: pd.DataFrame, x: str, y: str, log_x: bool = False) -> alt.LayerChart:
    """The pi* frontier: a dashed black line through hollow diamonds (the optimum at each beta), labelled with
    beta; drawn under the methods' points, so a method that reaches pi* shows inside its diamond."""
    base = alt.Chart(df).encode(
        x=alt.X(field=_q(x), type="quantitative", scale=_scale(log_x)), y=alt.Y(field=_q(y), type="quantitative")
    )
    line = base.mark_line(
        color="black",
        strokeDash=[6, 3],
        point=alt.OverlayMarkDef(color="black", shape="diamond", size=260, filled=False, strokeWidth=1.5),
    )
    text = base.mark_text(align="left", dx=9, dy=-9, color="black").encode(text="label:N")
    tips = [
        "label:N",
        alt.Tooltip(field=_q(x), type="quantitative", title=x),
        alt.Tooltip(field=_q(y), type="quantitative", title=y),
    ]
    return line.encode(order="beta:Q", tooltip=tips) + text


def heatmap(
    df: pd.DataFrame,
    x: str,
    y: str,
    value: str,
    title: str,
    scheme: str = "viridis",
    domain_mid: float | None = None,
    row_px: int = 34,
    y_type: str = "nominal",
    fmt: str = ".3g",
    domain: tuple[float, float] | None = None,
    label: str | None = None,
    algo: str | None = None,
):
    """Rectangles of ``value`` over ``x`` (ordinal) and ``y`` (``y_type``), ``row_px`` a row; numbers written in
    rows of 20 px or more (or the column ``label`` instead).

    ``domain``: the colour scale's ends, values beyond drawn at the end colour (an outlier does not wash out the
    rest). ``algo``: a column naming each row's algorithm, shown as a strip of its colour left of the map.
    """
    kw = {"scheme": scheme}
    if domain_mid is not None:
        kw["domainMid"] = domain_mid
    if domain is not None:
        kw.update(domain=list(domain), clamp=True)
    scale = alt.Scale(**kw)
    Yax = alt.Y(field=_q(y), type=y_type, title=None if y_type == "nominal" else y, axis=alt.Axis(labelLimit=400))
    base = alt.Chart(df).encode(x=alt.X(field=_q(x), type="ordinal", title=x, axis=alt.Axis(labelAngle=0)), y=Yax)
    V = dict(field=_q(value), type="quantitative")
    rect = base.mark_rect().encode(
        color=alt.Color(**V, title=title, scale=scale),
        tooltip=[
            alt.Tooltip(field=_q(y), type="nominal", title=y),
            alt.Tooltip(field=_q(x), type="ordinal", title=x),
            alt.Tooltip(**V, format=fmt, title=value),
            *([alt.Tooltip(field=_q(label), type="nominal")] if label else []),
        ],
    )
    layers = [rect]
    if row_px >= 20:
        ink = _ink(df[value], domain_mid, value, domain)
        text = alt.Text(field=_q(label), type="nominal") if label else alt.Text(**V, format=fmt)
        layers.append(base.mark_text(fontSize=11).encode(text=text, color=ink))
    heat = alt.layer(*layers).properties(height=alt.Step(row_px), width=alt.Step(96 if label else 64), title=title)
    if algo is None:
        return heat
    strip = (
        alt.Chart(df)
        .mark_square(size=140)
        .encode(y=alt.Y(field=_q(y), type=y_type, axis=None), color=algo_colour(df[algo], algo))
        .properties(width=14, height=alt.Step(row_px))
    )
    return alt.hconcat(strip, heat, spacing=2).resolve_scale(color="independent")


def _ink(values: pd.Series, mid: float | None, field: str, domain: tuple[float, float] | None = None):
    """Black text on the light end of the colour scale, white on the dark end."""
    v = values.astype(float)
    if not len(v) or not v.notna().any():
        return alt.value("black")
    f = f"datum[{_q(field)!r}]"
    if mid is None:  # viridis, magma: light at the top
        lo, hi = domain if domain is not None else (float(v.min()), float(v.max()))
        return alt.condition(f"{f} > {(lo + hi) / 2!r}", alt.value("black"), alt.value("white"))
    spread = float((v - mid).abs().max()) or 1.0  # diverging: light in the middle
    return alt.condition(f"abs({f} - {mid!r}) < {spread / 2!r}", alt.value("black"), alt.value("white"))


def _q(name: str) -> str:
    """A field name with Vega-Lite's nested-access characters (``. [ ]``) escaped."""
    for ch in ".[]":
        name = name.replace(ch, "\\" + ch)
    return name
