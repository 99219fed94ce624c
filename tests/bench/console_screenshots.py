"""Two screenshots of the web console for the README, taken with Debian's Chromium (Playwright):
docs/console-list.png and docs/console-conversation.png.

    uv run python -m tests.bench.console_screenshots [--out docs]

It stores a few conversations in a throw-away SQLite database (the same builders as the console's tests), serves
the real app with uvicorn on a free loopback port, signs in and takes the pictures.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from service.config import Settings
from service.storage.db import create_engine
from service.web.app import create_app
from tests.support import console, records
from tests.support.databases import migrated_sqlite
from tests.support.live import live_server

TOKEN = "screenshot-token"
TITLES = (
    ("Refund for a double charge", "The caller was charged twice; the agent opened a refund."),
    ("Rebooking a dentist appointment", "Moved the appointment from Tuesday to Thursday at 10:00."),
    ("Question about opening hours", "The caller asked whether the shop is open on Sunday."),
    ("Delivery address change", "Changed the delivery address for order 8812 before dispatch."),
    ("Cancelled subscription", "The caller cancelled the premium plan; no refund was due."),
)


def populate(url: str, data_dir: Path, now: int) -> None:
    engine = create_engine(url)
    console.store_rich(engine, data_dir, "conv_01jd8qz4m2r7", now - 420, console.tone_mp3(30))
    observations = []
    for index, (title, summary) in enumerate(TITLES):
        detail = console.rich_detail(f"conv_01jd8{index}x7k2p{index}", now - 1800 * (index + 1), "agent_sales")
        detail["agent_name"] = "Sam (sales)"
        detail["analysis"]["call_summary_title"] = title
        detail["analysis"]["transcript_summary"] = summary
        observations.append(console.observe(detail))
    observations += [
        records.summary(f"conv_01jd7r{i}m3", agent_id="agent_support", start=now - 9000 - 600 * i) for i in range(3)
    ]
    records.store(engine, observations)
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Chromium is not installed: apt-get install -y chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        url = migrated_sqlite(f"{tmp}/postcall.db")
        settings = Settings(database_url=url, data_dir=Path(tmp) / "data", api_tokens=TOKEN, _env_file=None)  # type: ignore[call-arg]
        populate(url, settings.data_dir, int(time.time()))
        with live_server(create_app(settings)) as base, sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(base_url=base, viewport={"width": 1200, "height": 760})
            page.goto("/console/sign-in")
            page.get_by_label("Token").fill(TOKEN)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("heading", name="Conversations").wait_for()
            page.screenshot(path=str(args.out / "console-list.png"))
            page.get_by_role("link", name="Missing parcel 4471").click()
            page.wait_for_function("document.getElementById('player').readyState >= 1")
            page.get_by_role("button", name="Play from 0:12").click()
            page.set_viewport_size({"width": 1200, "height": 1150})  # the player, the turns and the analysis
            page.screenshot(path=str(args.out / "console-conversation.png"))
            browser.close()
    print(f"wrote {args.out / 'console-list.png'} and {args.out / 'console-conversation.png'}")


if __name__ == "__main__":
    main()
