"""The sample viewer: a run's rendered completions (``samples.jsonl``) at one evaluation step, with the tokens the
policy did not write set apart.

Tasks render a completion as words (``Task.render``) and bracket the spans that are not the policy's answer:
the tool-use task brackets each observation token the environment wrote (``lookup k1 -> call k1 [v2] v2 <end>``),
the scratch-addition task brackets the scratch (``12 + 9 -> [1 2] = 21 <end>``). ``segments`` splits a rendered
sample into the prompt, the policy's words and those bracketed spans; ``sample_html`` draws one sample as a line of
HTML (every word escaped) with the spans shaded and labelled by what they are for the run's task.
"""

from __future__ import annotations

import html
import re

BRACKETED = re.compile(r"\[([^\[\]]*)\]")
SPAN_KIND = {"tool_use": "observation", "scratch_add": "scratch"}  # task -> what its brackets hold
SPAN_HELP = {
    "observation": "written by the environment (the tool's answer): never sampled, no loss, no KL, no advantage",
    "scratch": "the policy's scratch before its answer: never rewarded or supervised",
    "bracketed": "set apart by the task's rendering",
}
STYLE = {
    "prompt": "color:#555",
    "arrow": "color:#999",
    "policy": "font-weight:600",
    "observation": "background:#fde7c6;border:1px solid #e0a44a;border-radius:3px;padding:0 3px;font-style:italic",
    "scratch": "background:#e3eefb;border:1px solid #7aa6da;border-radius:3px;padding:0 3px",
    "bracketed": "background:#eee;border-radius:3px;padding:0 3px",
}


def span_kind(task: str | None) -> str:
    """What the bracketed spans of ``task``'s samples are: ``observation``, ``scratch`` or ``bracketed``."""
    return SPAN_KIND.get(task or "", "bracketed")


def segments(text: str, kind: str = "bracketed") -> list[tuple[str, str]]:
    """``[(part, text), ...]`` of a rendered sample: ``prompt`` and ``arrow`` (when the text has `` -> ``), then
    the completion as ``policy`` runs and ``kind`` spans (the bracketed ones, brackets dropped). Joining the texts
    with the brackets put back gives ``text`` again, up to spaces."""
    out: list[tuple[str, str]] = []
    prompt, sep, completion = text.partition(" -> ")
    if not sep:  # no prompt part: the whole text is the completion
        prompt, completion = "", text
    else:
        out += [("prompt", prompt), ("arrow", "->")]
    pos = 0
    for m in BRACKETED.finditer(completion):
        if before := completion[pos : m.start()].strip():
            out.append(("policy", before))
        out.append((kind, m.group(1).strip()))
        pos = m.end()
    if rest := completion[pos:].strip():
        out.append(("policy", rest))
    return out


def sample_html(text: str, reward: float | None, kind: str = "bracketed") -> str:
    """One sample as a line of HTML: prompt, arrow, the policy's words in bold, ``kind`` spans shaded with a
    tooltip, then the reward. Every piece of the sample's text is escaped."""
    parts = []
    for part, words in segments(text, kind):
        tip = f' title="{html.escape(kind + ": " + SPAN_HELP[kind])}"' if part == kind else ""
        parts.append(f'<span class="wb-{part}" style="{STYLE[part]}"{tip}>{html.escape(words)}</span>')
    r = "" if reward is None or reward != reward else f' <span style="color:#777">(reward {reward:.3g})</span>'
    return '<div style="font-family:monospace;margin:2px 0">' + " ".join(parts) + r + "</div>"


def legend_html(kind: str) -> str:
    """The key to the shading: what the run's bracketed spans are."""
    return (
        f'<span style="{STYLE[kind]}">{html.escape(kind)}</span> '
        f'<span style="color:#666">{html.escape(SPAN_HELP[kind])}</span>'
    )
