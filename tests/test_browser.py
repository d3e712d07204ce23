"""The headless-Chromium harness (tests/browser.py) on small pages: errors, images, requests, clicks, screenshots."""

from __future__ import annotations

import base64
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import Browser, BrowserError, chromium_or_skip, find_chromium

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_png(width: int, height: int) -> bytes:
    """A grey RGB PNG of the given size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * (3 * width) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def write_page(folder: Path, body: str, name: str = "page.html") -> Path:
    page = folder / name
    page.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>t</title></head><body>{body}</body></html>"
    )
    return page


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with Browser(chromium_or_skip()) as started:
        yield started


def test_clean_page_has_no_errors_and_loads_its_images(browser: Browser, tmp_path: Path) -> None:
    (tmp_path / "local.png").write_bytes(make_png(7, 5))
    inline = "data:image/png;base64," + base64.b64encode(make_png(3, 2)).decode()
    # The lazy image sits far below the fold: images() must still get it loaded.
    page = write_page(
        tmp_path,
        f"<img id='inline' src='{inline}'><img id='local' src='local.png'>"
        "<div style='height: 6000px'></div><img id='lazy' loading='lazy' src='local.png'>",
    )
    load = browser.open(page)
    images = browser.images()
    assert load.url == page.resolve().as_uri()
    assert load.console_errors == []
    assert load.failed_requests == []
    assert load.external_requests == []
    assert 0 < load.load_ms < 30_000
    assert [(img["natural_width"], img["natural_height"], img["complete"]) for img in images] == [
        (3, 2, True),
        (7, 5, True),
        (7, 5, True),
    ]
    assert images[0]["src"].startswith("data:image/png")
    assert images[1]["src"] == (tmp_path / "local.png").resolve().as_uri()


@pytest.mark.parametrize(
    "script, expected",
    [
        ("console.error('x')", "x"),
        ("console.assert(1 === 2, 'one is not two')", "Assertion failed: one is not two"),
        ("throw new Error('boom')", "Uncaught Error: boom"),
        ("Promise.reject(new Error('late'))", "Uncaught (in promise) Error: late"),
    ],
)
def test_console_errors_and_uncaught_exceptions_are_reported(
    browser: Browser, tmp_path: Path, script: str, expected: str
) -> None:
    load = browser.open(write_page(tmp_path, f"<p>hi</p><script>{script}</script>"))
    assert len(load.console_errors) == 1, load.console_errors
    assert load.console_errors[0].startswith(expected)


def test_errors_after_the_load_land_on_the_open_page(browser: Browser, tmp_path: Path) -> None:
    load = browser.open(write_page(tmp_path, "<button id='b' onclick=\"console.error('clicked')\">b</button>"))
    assert load.console_errors == []
    browser.click("#b")
    browser.evaluate("0")  # a round trip: the console event comes before its answer
    assert load.console_errors == ["clicked"]


def test_broken_image_is_reported(browser: Browser, tmp_path: Path) -> None:
    load = browser.open(write_page(tmp_path, "<img src='missing.png'>"))
    (image,) = browser.images()
    assert image["complete"] and image["natural_width"] == 0
    missing = (tmp_path / "missing.png").resolve().as_uri()
    assert load.failed_requests == [f"{missing} net::ERR_FILE_NOT_FOUND"]
    # Chromium reports a failed resource load as a Log.entryAdded error, not on the console API.
    assert load.console_errors == [f"Failed to load resource: net::ERR_FILE_NOT_FOUND ({missing})"]


def test_external_request_is_recorded_offline_and_the_page_still_loads(browser: Browser, tmp_path: Path) -> None:
    url = "http://example.com/x.js"
    load = browser.open(write_page(tmp_path, f"<p id='p'>text</p><script src='{url}'></script>"))
    assert load.external_requests == [url]
    assert url in browser.external_requests
    assert load.failed_requests == [f"{url} net::ERR_INTERNET_DISCONNECTED"]
    assert browser.evaluate("document.getElementById('p').textContent") == "text"


def test_evaluate_returns_values_and_raises_when_the_script_throws(browser: Browser, tmp_path: Path) -> None:
    browser.open(write_page(tmp_path, "<p>hi</p>"))
    assert browser.evaluate("1 + 1") == 2
    assert browser.evaluate("({a: [1, 'b', null], t: document.title})") == {"a": [1, "b", None], "t": "t"}
    assert browser.evaluate("new Promise((resolve) => setTimeout(() => resolve('later'), 10))") == "later"
    assert browser.evaluate("undefined") is None
    with pytest.raises(AssertionError, match="kaputt"):
        browser.evaluate("(() => { throw new Error('kaputt'); })()")
    with pytest.raises(AssertionError, match="rejected"):
        browser.evaluate("Promise.reject(new Error('rejected'))")


def test_click_changes_the_dom(browser: Browser, tmp_path: Path) -> None:
    browser.open(
        write_page(
            tmp_path,
            "<div id='out'></div><button class='go' "
            "onclick=\"document.getElementById('out').textContent += 'clicked'\">go</button>",
        )
    )
    browser.click("button.go")
    browser.click("button.go")
    assert browser.evaluate("document.getElementById('out').textContent") == "clickedclicked"
    with pytest.raises(AssertionError, match="no element matches #nothing"):
        browser.click("#nothing")


def test_screenshot_writes_a_png(browser: Browser, tmp_path: Path) -> None:
    browser.open(write_page(tmp_path, "<div style='height: 2500px; background: #08f'>tall</div>"))
    viewport = browser.screenshot(tmp_path / "viewport.png")
    assert png_size(viewport.read_bytes()) == (browser.width, browser.height)
    full = browser.screenshot(tmp_path / "full.png", full_page=True)
    width, height = png_size(full.read_bytes())
    assert width == browser.width and height >= 2500
    # The viewport is back to its size afterwards.
    assert browser.evaluate("[window.innerWidth, window.innerHeight]") == [browser.width, browser.height]


def test_open_fails_clearly_on_a_missing_file(browser: Browser, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="ERR_FILE_NOT_FOUND"):
        browser.open(tmp_path / "nothing.html")


def _live_group_members(pgid: int) -> list[int]:
    """The processes of a process group that are alive (zombies waiting for their reaper are not)."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = (Path("/proc") / entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(entry))
    return live


@pytest.mark.slow  # a second Chromium: a few seconds on a busy machine
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_hung_call_times_out_and_closing_kills_chromium_and_removes_its_profile() -> None:
    with Browser(chromium_or_skip()) as own:
        assert own.pid is not None and own.profile_dir is not None
        pid, profile = own.pid, own.profile_dir
        assert profile.is_dir() and _live_group_members(pid)
        with pytest.raises(BrowserError, match="Chromium hung: no answer to Runtime.evaluate within 0.3 s"):
            own.evaluate("new Promise(() => {})", timeout=0.3)
        assert own.evaluate("'still usable'") == "still usable"
    assert not profile.exists()
    assert _live_group_members(pid) == []


def test_find_chromium_and_the_skip_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "my-chrome"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SEGPIPE_CHROMIUM", str(fake))
    assert find_chromium() == str(fake)
    with pytest.raises(
        pytest.skip.Exception,
        match=r"cannot start in this environment \(BrowserError: Chromium closed the DevTools pipe \(exit code 1",
    ):
        chromium_or_skip()
    monkeypatch.setenv("SEGPIPE_CHROMIUM", str(tmp_path / "absent"))
    assert find_chromium() is None
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        chromium_or_skip()
