"""Altair (Vega-Lite) charts: lines with bands, scatter with error bars, heatmaps."""

from __future__ import annotations

import altair as alt
import pandas as pd

PALETTE = alt.Scale(scheme="tableau10")  # distinct hues per method (Streamlit's theme starts with two blues)
LEGEND = alt.Legend(orient="bottom", columns=3, labelLimit=400, symbolOpacity=1, symbolType="stroke")


def _scale(log: bool) -> alt.Scale:
    return alt.Scale(type="log") if log else alt.Scale(zero=False)


def lines(
    df: pd.DataFrame,
    x: str,
    y_title: str,
    log_x: bool = False,
    log_y: bool = False,
    color: str = "line",
    height: int = 380,
) -> alt.Chart:
    """Mean line per ``color`` group with its confidence band (columns ``mean``, ``lo``, ``hi``)."""
    base = alt.Chart(df).encode(
        x=alt.X(f"{x}:Q", title=x, scale=_scale(log_x)),
        color=alt.Color(f"{color}:N", title=None, scale=PALETTE, legend=LEGEND),
    )
    band = base.mark_area(opacity=0.18).encode(y=alt.Y("lo:Q", title=y_title, scale=_scale(log_y)), y2="hi:Q")
    line = base.mark_line().encode(
        y=alt.Y("mean:Q", title=y_title, scale=_scale(log_y)),
        tooltip=[
            color,
            x,
            alt.Tooltip("mean:Q", format=".4g"),
            alt.Tooltip("lo:Q", format=".4g"),
            alt.Tooltip("hi:Q", format=".4g"),
            "n",
        ],
    )
    return (band + line).properties(height=height)


def scatter(
    df: pd.DataFrame,
    x: str,
    y: str,
    color: str,
    shape: str | None = None,
    log_x: bool = False,
    tooltip: list[str] | None = None,
    height: int = 420,
) -> alt.Chart:
    """Points at the means with error bars from ``<x>:lo``/``<x>:hi`` and ``<y>:lo``/``<y>:hi`` when present."""
    enc = {
        "color": alt.Color(
            field=_q(color),
            type="nominal",
            title=None,
            scale=PALETTE,
            legend=alt.Legend(orient="bottom", columns=3, labelLimit=400),
        )
    }
    base = alt.Chart(df).encode(**enc)
    marks = (
        {"shape": alt.Shape(field=_q(shape), type="nominal", title=None, legend=alt.Legend(orient="bottom"))}
        if shape
        else {}
    )
    X = alt.X(field=_q(x), type="quantitative", title=x, scale=_scale(log_x))
    Y = alt.Y(field=_q(y), type="quantitative", title=y, scale=alt.Scale(zero=False))
    tips = [
        alt.Tooltip(field=_q(c), type="nominal" if df[c].dtype == object else "quantitative", title=c)
        for c in (tooltip or [color, x, y])
    ]
    pts = base.mark_point(filled=True, size=80).encode(x=X, y=Y, tooltip=tips, **marks)
    layers = [pts]
    if f"{x}:lo" in df:
        layers.append(
            base.mark_errorbar(ticks=False).encode(
                x=alt.X(field=_q(x + ":lo"), type="quantitative", scale=_scale(log_x), title=x),
                x2=alt.X2(field=_q(x + ":hi")),
                y=Y,
            )
        )
    if f"{y}:lo" in df:
        layers.append(
            base.mark_errorbar(ticks=False).encode(
                x=X, y=alt.Y(field=_q(y + ":lo"), type="quantitative", title=y), y2=alt.Y2(field=_q(y + ":hi"))
            )
        )
    return alt.layer(*layers).properties(height=height)


def frontier(df: pd.DataFrame, x: str, y: str, log_x: bool = False) -> alt.Chart:
    """The pi* frontier: a black line through the optimum at each beta, labelled with beta."""
    base = alt.Chart(df).encode(
        x=alt.X(field=_q(x), type="quantitative", scale=_scale(log_x)), y=alt.Y(field=_q(y), type="quantitative")
    )
    line = base.mark_line(
        color="black", strokeDash=[6, 3], point=alt.OverlayMarkDef(color="black", shape="diamond", size=90)
    )
    text = base.mark_text(align="left", dx=7, dy=-7, color="black").encode(text="label:N")
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
) -> alt.Chart:
    """Rectangles of ``value`` over ``x`` (ordinal) and ``y`` (``y_type``), ``row_px`` a row; numbers written in
    rows of 20 px or more."""
    scale = alt.Scale(scheme=scheme, domainMid=domain_mid) if domain_mid is not None else alt.Scale(scheme=scheme)
    base = alt.Chart(df).encode(
        x=alt.X(field=_q(x), type="ordinal", title=x, axis=alt.Axis(labelAngle=0)),
        y=alt.Y(field=_q(y), type=y_type, title=None if y_type == "nominal" else y, axis=alt.Axis(labelLimit=400)),
    )
    V = dict(field=_q(value), type="quantitative")
    rect = base.mark_rect().encode(
        color=alt.Color(**V, title=title, scale=scale),
        tooltip=[
            alt.Tooltip(field=_q(y), type="nominal", title=y),
            alt.Tooltip(field=_q(x), type="ordinal", title=x),
            alt.Tooltip(**V, format=fmt, title=value),
        ],
    )
    layers = [rect]
    if row_px >= 20:
        layers.append(
            base.mark_text(fontSize=11).encode(text=alt.Text(**V, format=fmt), color=_ink(df[value], domain_mid, value))
        )
    return alt.layer(*layers).properties(height=alt.Step(row_px), title=title)


def _ink(values: pd.Series, mid: float | None, field: str):
    """Black text on the light end of the colour scale, white on the dark end."""
    v = values.astype(float)
    if not len(v) or not v.notna().any():
        return alt.value("black")
    f = f"datum[{_q(field)!r}]"
    if mid is None:  # viridis, magma: light at the top
        return alt.condition(f"{f} > {float(v.min() + v.max()) / 2!r}", alt.value("black"), alt.value("white"))
    spread = float((v - mid).abs().max()) or 1.0  # diverging: light in the middle
    return alt.condition(f"abs({f} - {mid!r}) < {spread / 2!r}", alt.value("black"), alt.value("white"))


def _q(name: str) -> str:
    """A field name with Vega-Lite's nested-access characters (``. [ ]``) escaped."""
    for ch in ".[]":
        name = name.replace(ch, "\\" + ch)
    return name
