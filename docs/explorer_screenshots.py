"""Screenshots of explorer pages in headless Chromium (the README's docs/figures/explorer_*.png).

    python docs/explorer_screenshots.py PAGE.html OUT.png [--fragment 'view=head&...']
        [--hover 'CSS selector'] [--width 1280] [--height 800]

Opens PAGE.html from file:// with Debian's chromium and chromedriver (network off), waits until
the page is ready, optionally hovers an element, and writes a PNG. The README's screenshots
come from the reverse task (`python experiments/train.py --task reverse --workdir runs/reverse`):

    python docs/explorer_screenshots.py runs/reverse/figures/view.html \\
        docs/figures/explorer_head.png \\
        --fragment 'view=head&example=1&layer=decoder/layers/0/cross_attention' \\
        --hover '#view-head .tok[data-side="query"][data-index="3"]'
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars",
)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--fragment", default="")
    parser.add_argument("--hover", default=None, help="CSS selector of an element to hover")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args()
    if not args.page.is_file():
        print(f"error: no such page {args.page}", file=sys.stderr)
        return 2

    from selenium import webdriver
    from selenium.webdriver import ActionChains
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={args.width},{args.height}")
    profile = tempfile.mkdtemp(prefix="explorer-shot-")
    options.add_argument(f"--user-data-dir={profile}")
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.set_network_conditions(offline=True, latency=0, download_throughput=0,
                                      upload_throughput=0)  # fmt: skip
        url = args.page.resolve().as_uri() + (f"#{args.fragment}" if args.fragment else "")
        driver.get(url)
        for _ in range(300):
            if driver.execute_script("return document.body.dataset.ready") == "true":
                break
            time.sleep(0.05)
        if args.hover:
            target = driver.find_element("css selector", args.hover)
            driver.execute_script("arguments[0].scrollIntoView({block: 'nearest'})", target)
            ActionChains(driver).move_to_element(target).perform()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
