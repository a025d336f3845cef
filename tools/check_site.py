"""Open every page of the built book in headless Chromium, offline, and check that it works.

    .venv/bin/jupyter-book build -W book/ && .venv/bin/python tools/check_site.py book/_build/html

For each HTML page of the site: serve the site on localhost, load the page with every request to another host
blocked (and recorded), and check that there are no console errors, no uncaught exceptions, no request to
another host, and that every plotly figure on the page was drawn (each ``plotly-graph-div`` holds plotly's SVG).
A screenshot of each chapter goes to ``--screenshots`` (default: ``<site>/../screenshots``). Exits 1 and lists
the problems if any page fails.

Needs Chromium (Debian: ``apt-get install chromium``) and the ``playwright`` package (the project's ``site``
extra); it uses the system Chromium, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the check's output readable
        pass


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def pages(root: Path) -> list[Path]:
    skip = {"genindex.html", "search.html"}
    return sorted(p for p in root.glob("*.html") if p.name not in skip)


def check_page(browser, base: str, page_path: Path, screenshots: Path | None) -> list[str]:
    problems, outside = [], []
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()

    def route(request_route):
        url = request_route.request.url
        if url.startswith(base) or url.startswith("data:") or url.startswith("blob:"):
            request_route.continue_()
        else:
            outside.append(url)
            request_route.abort()

    page.route("**/*", route)
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(f"uncaught exception: {error}"))
    page.goto(f"{base}/{page_path.name}", wait_until="load")
    page.wait_for_timeout(500)
    figures = page.locator("div.plotly-graph-div").count()
    drawn = page.locator("div.plotly-graph-div svg.main-svg").evaluate_all(
        "svgs => new Set(svgs.map(s => s.closest('div.plotly-graph-div'))).size")
    if drawn != figures:
        problems.append(f"{figures - drawn} of {figures} plotly figures not drawn")
    if screenshots is not None and page_path.stem[:2].isdigit():
        page.screenshot(path=str(screenshots / f"{page_path.stem}.png"), full_page=False)
    context.close()
    problems += [f"request to another host: {url}" for url in sorted(set(outside))]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check_site.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site, e.g. book/_build/html")
    parser.add_argument("--screenshots", type=Path, default=None, help="folder for one screenshot per chapter")
    parser.add_argument("--chromium", default=None, help="the Chromium executable (default: found on the system)")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        parser.error(f"{args.site}: no index.html (build the book first)")
    chromium = args.chromium or next((c for c in CHROMIUM_CANDIDATES if Path(c).exists()), shutil.which("chromium"))
    if not chromium:
        parser.error("no Chromium found: install it (Debian: apt-get install chromium) or pass --chromium")
    screenshots = args.screenshots or args.site.parent / "screenshots"
    screenshots.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    server, base = serve(args.site)
    failures, checked = {}, 0
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            for page_path in pages(args.site):
                problems = check_page(browser, base, page_path, screenshots)
                checked += 1
                status = "ok" if not problems else f"{len(problems)} problem(s)"
                print(f"{page_path.name:45s} {status}")
                if problems:
                    failures[page_path.name] = problems
            browser.close()
    finally:
        server.shutdown()
    for name, problems in failures.items():
        for problem in problems:
            print(f"{name}: {problem}", file=sys.stderr)
    size = sum(p.stat().st_size for p in args.site.rglob("*") if p.is_file())
    print(f"{checked} pages checked, {len(failures)} with problems; site {size / 2**20:.1f} MiB; "
          f"screenshots in {screenshots}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
