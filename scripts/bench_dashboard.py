"""Time every dashboard page in headless Chromium on a large store: 500 runs x 2,000 steps by default.

    .venv/bin/python scripts/bench_dashboard.py [--runs 500] [--steps 2000] [--results DIR] [--repeat 3]
        [--apptest]

The store is synthesised by ``benchmarks/dashboard_render.py`` (through the store's own functions: the index,
atomic publishing; no training). A time runs from a click on a sidebar link, or from the start of a navigation,
to the last change to the app's DOM before the page came to rest (script run over, every chart's marks drawn:
SVG elements with a box; the page's own clock, read from a MutationObserver, not the time of a look).

Judged (exit 1 if over 2 s): moving between pages by the sidebar's links, how a researcher uses the dashboard
once it is open: on a fresh server per repetition, the Studies page opened and read for ``READ_S`` seconds,
then each page's first visit (the server's caches empty but for the study's background reads; the median over
repetitions is judged), then a second round; with ``--apptest``, each page's first render on the server alone
(``benchmarks/dashboard_render.py``, AppTest). Reported, not judged: each view opened by its URL in a new tab
of a browser that has loaded the dashboard once (its HTTP cache holds Streamlit's script bundle), again, and in
a fresh browser context; these include Streamlit's own start in the tab, measured as the floor (a three-line
Streamlit app opened the same way), and the first chart of a tab. Besides each page at its defaults, the
heavier states: Compare with log y and smoothing, the Frontier with training paths on a log x axis. Also
reported: the sidebar's first visits when the first click comes at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 2.0
READ_S = 5.0  # seconds a researcher spends on the Studies page before the first click, in the navigation bench
STUDY = "bench"
VIEWS = {  # name -> (path and query, a text the page shows when it is complete)
    "studies": ("?study=bench", "Open a run"),
    "compare": ("compare?study=bench", "at the last logged step"),
    "compare log y, smoothed": (
        "compare?study=bench&compare_metric=kl/exact&compare_log_y=true&compare_smooth=0.6",
        "at the last logged step",
    ),
    "frontier": ("frontier?study=bench", "Where each method ends"),
    "frontier paths, log x": (
        "frontier?study=bench&frontier_paths=true&frontier_log_x=true",
        "Where each method ends",
    ),
    "gradients": ("gradients?study=bench", "Over training"),
    "credit": ("credit?study=bench", "Over training"),
    "convergence": ("convergence?study=bench", "vs each method"),
    "claims": ("claims?study=bench", "Study bench"),
}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
CHROMIUM_ARGS.append("--disable-dev-shm-usage")
MARKS_JS = """() => Array.from(document.querySelectorAll('[data-testid="stVegaLiteChart"]')).map(chart =>
    Array.from(chart.querySelectorAll('.role-mark > path, .role-mark > rect'))
        .filter(e => { const b = e.getBBox(); return b.width > 0 && b.height > 0; }).length)"""


WATCH_JS = """(() => {  // the time of the last change to the app's DOM (charts drawing into their SVG included)
    if (window.__watching) return;
    window.__watching = true;
    const install = () => {
        const app = document.querySelector('[data-testid="stApp"]');
        if (!app) return setTimeout(install, 5);
        window.__lastChange = performance.now();
        const opts = {subtree: true, childList: true, attributes: true, characterData: true};
        new MutationObserver(() => { window.__lastChange = performance.now(); }).observe(app, opts);
    };
    install();
})()"""


def render_module():
    spec = importlib.util.spec_from_file_location("dashboard_render", ROOT / "benchmarks" / "dashboard_render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(results: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "workbench.cli", "dashboard", "--results", str(results), "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError("workbench dashboard did not start")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def timed_visit(browser, url: str, ready: str, context=None) -> tuple[float, list[int], bool]:
    """Seconds from navigation to the final page (script done, ``ready`` shown, every chart drawn and unchanged
    over three looks 150 ms apart); the marks per chart; whether a Streamlit exception showed. ``context``: a
    browser context to open the page in (its HTTP cache holds Streamlit's script bundle, as a researcher's
    browser does after the first page); None: a fresh context (an empty cache: the bundle is fetched and
    compiled again)."""
    ctx = context or browser.new_context(viewport={"width": 1400, "height": 2200})
    page = ctx.new_page()
    page.set_default_timeout(120_000)
    page.add_init_script(WATCH_JS)
    page.goto(url)
    page.get_by_text(ready).first.wait_for()
    elapsed, marks = settled(page, 0.0)  # page time 0: the navigation's start
    failed = page.locator('[data-testid="stException"]').count() > 0
    page.close()
    if context is None:
        ctx.close()
    return elapsed, marks, failed


TRIVIAL_APP = 'import streamlit as st\nst.title("Trivial")\nst.write("hello there")\n'
NAV = {  # sidebar link -> a text its page shows when complete (Studies last: the way back)
    "Compare": "at the last logged step",
    "Frontier": "Where each method ends",
    "Gradients": "Over training",
    "Credit": "Over training",
    "Convergence map": "vs each method",
    "Claims": "Study bench",
    "Studies": "Open a run",
}


def settled(page, t0: float) -> tuple[float, list[int]]:
    """Seconds from ``t0`` (the page's clock, ``performance.now()`` in ms / 1000) to the last change to the app's
    DOM before the page came to rest: script done, every chart drawn, text and marks the same over three looks
    150 ms apart and no change to the DOM in between; and the marks per chart. (The looks only decide that the
    page is at rest; the time is the page's own record of its last change, not the time of a look.)"""
    last, since, last_change = None, 0, None
    while since < 3:
        page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for()
        now = (page.locator('[data-testid="stMain"]').inner_text(), page.evaluate(MARKS_JS))
        changed = page.evaluate("window.__lastChange")
        if now == last and all(n > 0 for n in now[1]) and changed == last_change:
            since += 1
        else:
            last, since, last_change = now, 0, changed
        page.wait_for_timeout(150)
    return last_change / 1000 - t0, last[1]


def floor_bench(browser, visits: int = 4) -> list[float]:
    """A three-line Streamlit app opened in a browser that has loaded it before: what any page costs on this
    machine before the dashboard does anything (Streamlit's frontend starting, its websocket, one script run)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_floor_"))
    (tmp / "app.py").write_text(TRIVIAL_APP)
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(tmp / "app.py"), "--server.port", str(port)]
    cmd += ["--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        ctx = browser.new_context(viewport={"width": 1400, "height": 2200})
        times = [timed_visit(browser, url, "hello there", ctx)[0] for _ in range(visits + 1)][1:]
        ctx.close()
        return times
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def navigation_bench(browser, results: Path, rounds: int = 2, read_s: float = READ_S) -> dict[str, list[float]]:
    """Pages reached by the sidebar's links after the dashboard has loaded once (no page reload: how a researcher
    moves between pages), on a fresh server: round 0 is each page's first render (the server's caches empty,
    the first chart of the session included), later rounds with the caches full. The Studies page is read for
    ``read_s`` seconds before the first click (the server's background reads and the browser's warm-up run
    then; 0: click at once). Returns the times per page and, under "ready", when the warm-up had finished."""
    proc, url = serve(results)
    out: dict[str, list[float]] = {name: [] for name in NAV}
    try:
        ctx = browser.new_context(viewport={"width": 1400, "height": 2200})
        page = ctx.new_page()
        page.set_default_timeout(120_000)
        page.add_init_script(WATCH_JS)
        page.goto(f"{url}/?study={STUDY}")
        page.get_by_text(NAV["Studies"]).first.wait_for()
        settled(page, 0.0)
        page.wait_for_timeout(read_s * 1000)
        warm = page.evaluate("window.__workbenchPreloaded")
        out["ready"] = [warm / 1000 if isinstance(warm, (int, float)) and warm is not True else float("nan")]
        for _ in range(rounds):
            for name, ready in NAV.items():
                t0 = page.evaluate("performance.now()") / 1000
                page.locator('[data-testid="stSidebarNav"] a', has_text=name).first.click()
                page.get_by_text(ready).first.wait_for()
                out[name].append(settled(page, t0)[0])
        ctx.close()
    finally:
        stop(proc)
    return out


def browser_bench(results: Path, repeat: int, chromium: str) -> int:
    from playwright.sync_api import sync_playwright

    first: dict[str, list[float]] = {v: [] for v in VIEWS}
    again: dict[str, list[float]] = {v: [] for v in VIEWS}
    cold: dict[str, list[float]] = {v: [] for v in VIEWS}
    marks: dict[str, list[int]] = {}
    errors: set[str] = set()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        for _ in range(repeat):
            proc, url = serve(results)
            try:
                warm = browser.new_context(viewport={"width": 1400, "height": 2200})
                timed_visit(browser, f"{url}/claims", "Claims", warm)  # the server's imports; the bundle cached
                for name, (path, ready) in VIEWS.items():  # each page's first render: the server's caches empty
                    t, marks[name], failed = timed_visit(browser, f"{url}/{path}", ready, warm)
                    first[name].append(t)
                    if failed:
                        errors.add(name)
                for name, (path, ready) in VIEWS.items():
                    again[name].append(timed_visit(browser, f"{url}/{path}", ready, warm)[0])
                for name, (path, ready) in VIEWS.items():  # a browser that has never seen the dashboard
                    cold[name].append(timed_visit(browser, f"{url}/{path}", ready)[0])
                warm.close()
            finally:
                stop(proc)
        floor = floor_bench(browser)
        navs = [navigation_bench(browser, results) for _ in range(repeat)]
        hasty = navigation_bench(browser, results, rounds=1, read_s=0.0)
        browser.close()
    print(
        f"headless Chromium, a fresh server per repetition ({repeat}); 'first' and 'again': a new tab of a browser "
        f"that has loaded the dashboard once (Streamlit's script bundle in its HTTP cache), the server's caches "
        f"empty, then full; 'cold browser': a fresh browser context (no cache: the bundle fetched and compiled, a "
        f"fixed cost of Streamlit's frontend, not of the page); reported, not judged (see the floor below); "
        f"os.cpu_count() = {os.cpu_count()}, load average now {os.getloadavg()[0]:.1f}"
    )
    print(f"{'view':<26} {'first (s)':>10} {'median':>8} {'again (s)':>10} {'cold browser':>13}  marks per chart")
    over = 0
    for name in VIEWS:
        f = sorted(first[name])
        best, median = f[0], f[len(f) // 2]
        flag = "  ERROR" if name in errors else "" if best < LIMIT_S else "  (over 2 s)"
        over += name in errors
        print(
            f"{name:<26} {best:>10.2f} {median:>8.2f} {min(again[name]):>10.2f} {min(cold[name]):>13.2f}"
            f"  {marks[name]}{flag}"
        )
    print(
        f"\nthe floor: a three-line Streamlit app, the same browser, {len(floor)} visits: "
        f"{min(floor):.2f}-{max(floor):.2f} s (what any page opened by its URL costs here before the dashboard's "
        "own work)"
    )
    ready = sorted(n["ready"][0] for n in navs)
    print(
        f"\nmoving by the sidebar's links (no reload), a fresh server per repetition ({repeat}), after {READ_S:g} s "
        f"on the Studies page (the browser's warm-up of Streamlit's element code and Vega was over "
        f"{ready[0]:.1f}-{ready[-1]:.1f} s after the page opened): each page's first visit (best, median), then a "
        f"second visit; last column: each page's first visit when the first click comes as soon as Studies is "
        f"drawn (the server still importing the chart stack and reading the study in the background; not "
        f"judged); judged: the median first visit, limit {LIMIT_S:g} s"
    )
    print(f"{'page':<26} {'first (s)':>10} {'median':>8} {'again (s)':>10} {'at once':>9}")
    for name in NAV:
        f = sorted(n[name][0] for n in navs)
        flag = "" if f[len(f) // 2] < LIMIT_S else "  OVER"
        over += bool(flag)
        again_s = min(t for n in navs for t in n[name][1:])
        print(f"{name:<26} {f[0]:>10.2f} {f[len(f) // 2]:>8.2f} {again_s:>10.2f} {hasty[name][0]:>9.2f}{flag}")
    return 1 if over else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--results", default=None, help="store to write (if empty) and read; default: a temporary folder")
    ap.add_argument("--repeat", type=int, default=3, help="fresh servers; the best first render is judged")
    ap.add_argument("--apptest", action="store_true", help="also time the server-side render alone (AppTest)")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args(argv)
    render = render_module()
    tmp = Path(tempfile.mkdtemp(prefix="bench_dashboard_"))
    results = Path(args.results) if args.results else tmp / "results"
    try:
        if not (results / "index.sqlite").exists():
            t0 = time.perf_counter()
            render.synthesize(results, args.runs, args.steps, study=STUDY)
            size = sum(f.stat().st_size for f in results.rglob("*") if f.is_file()) / 2**20
            print(f"store: {args.runs} runs x {args.steps} steps in {time.perf_counter() - t0:.1f} s ({size:.0f} MiB)")
        rc = browser_bench(results, args.repeat, args.chromium)
        if args.apptest:
            rc |= render.main(["--results", str(results), "--repeat", str(args.repeat)])
        return rc
    finally:
        if not args.results:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
