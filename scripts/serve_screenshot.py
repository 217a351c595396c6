"""Photograph the search page of a real `hivlp serve` for the docs (README shows docs/serve.png).

    python scripts/serve_screenshot.py --out docs/serve.png --text "a dog runs on the grass" -- \
        --uri outputs/milvus/serve.db --name flickr8k_val --embeddings outputs/embeddings/val --checkpoint outputs/finetune

Everything after `--` goes to `hivlp serve`. The server is started on a free loopback port and stopped
afterwards; the page is rendered by Debian's chromium (hivlp.serve.browser).
"""

from __future__ import annotations

import argparse
import sys
from urllib.parse import urlencode

from hivlp.serve.browser import launch_chromium
from hivlp.serve.process import running_server

LOADED = "n => [...document.querySelectorAll('img.thumb')].filter(i => i.complete && i.naturalWidth > 0).length >= n"


def shrink_png(path: str) -> None:
    """256 colours (median cut, dithered): a third of the bytes, photos still read well in a README."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    small.save(path, "PNG", optimize=True)


def main(argv: list[str]) -> int:
    ours, serve_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/serve.png")
    p.add_argument("--text", default="a dog runs on the grass")
    p.add_argument("--level", default="fine", choices=("fine", "coarse"))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=1000)
    args = p.parse_args(ours)
    import httpx
    from playwright.sync_api import sync_playwright

    with running_server(serve_args) as url, sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": args.width, "height": args.height}, device_scale_factor=1)
            query = {"text": args.text, **({"level": args.level} if args.level != "fine" else {}),
                     **({"k": args.k} if args.k != 10 else {})}
            for level in ("fine", "coarse", "fine"):  # warm up: the page shows steady-state stage times
                httpx.get(f"{url}/api/search", params={"text": args.text, "level": level}, timeout=60)
            page.goto(f"{url}/?{urlencode(query)}")
            page.wait_for_function(LOADED, arg=min(args.k, 10), timeout=120_000)
            page.wait_for_function("document.querySelector('#health b') !== null")
            page.screenshot(path=args.out, full_page=True)
        finally:
            browser.close()
    shrink_png(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
