"""A headless Chromium for tests that look at segpipe's static HTML reports in a real browser.

No browser-automation package is needed: :class:`Browser` starts Chromium with
``--remote-debugging-pipe`` and speaks the DevTools protocol (CDP) itself. Chromium reads JSON
messages, each ended by a NUL byte, from its fd 3 and writes answers and events to its fd 4; one
page target is attached with ``flatten=true``, so its messages carry a ``sessionId``.

Every wait has a timeout, so a hung or crashed browser fails the test (:class:`BrowserError`, an
``AssertionError``) with a message that names what was awaited and the end of Chromium's stderr.
Leaving the ``with`` block always kills Chromium's whole process group and removes its temporary
profile.

Tests get the executable from :func:`chromium_or_skip`, which skips them, saying how to install
Chromium, where there is none or where it cannot start::

    with Browser(chromium_or_skip()) as browser:
        page = browser.open(tmp_path / "report.html")
        assert page.console_errors == []
"""

from __future__ import annotations

import base64
import fcntl
import itertools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

ENV_VAR = "SEGPIPE_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = f"install it (apt-get install chromium) or point ${ENV_VAR} at a Chromium/Chrome executable"
# URL schemes that stay on this machine; a request for any other is an external request.
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
STARTUP_TIMEOUT = 30.0
CLOSE_TIMEOUT = 5.0
_STDERR_TAIL = 2000

# The outcome of starting each executable once in this process: None where it started, else why not.
_PROBED: dict[str, str | None] = {}


class BrowserError(AssertionError):
    """Chromium failed, hung or answered with an error (an AssertionError: the test fails, it does not error)."""


def find_chromium() -> str | None:
    """The Chromium executable: ``$SEGPIPE_CHROMIUM`` when set, else chromium, chromium-browser or google-chrome on PATH."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return shutil.which(configured) or (configured if os.access(configured, os.X_OK) else None)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_or_skip() -> str:
    """The Chromium executable, or ``pytest.skip`` (with how to install it) when none is found or it cannot start.

    The first call for an executable starts it once to see that it works; the outcome is kept for
    the rest of the test session.
    """
    exe = find_chromium()
    if exe is None:
        where = f"${ENV_VAR}={os.environ[ENV_VAR]!r} is not executable" if os.environ.get(ENV_VAR) else "none on PATH"
        pytest.skip(f"Chromium not found ({where}): {INSTALL_HINT}")
    if exe not in _PROBED:
        try:
            with Browser(exe) as browser:
                browser.evaluate("1 + 1", timeout=STARTUP_TIMEOUT)
            _PROBED[exe] = None
        except (BrowserError, OSError) as exc:
            _PROBED[exe] = f"{type(exc).__name__}: {exc}"
    reason = _PROBED[exe]
    if reason is not None:
        pytest.skip(f"Chromium at {exe} cannot start in this environment ({reason}); {INSTALL_HINT}")
    return exe


@dataclass
class PageLoad:
    """What one :meth:`Browser.open` saw.

    The lists keep growing while the page stays open (errors raised by a later :meth:`Browser.click`
    land here too), until the next :meth:`Browser.open`.
    """

    url: str
    # console.error / console.assert messages, uncaught exceptions (Runtime.exceptionThrown) and
    # error-level browser log entries (Log.entryAdded), such as "Failed to load resource: ...".
    console_errors: list[str] = field(default_factory=list)
    # URLs requested with a scheme other than file:, data:, blob: or about:.
    external_requests: list[str] = field(default_factory=list)
    # URLs of requests that failed (Network.loadingFailed), with the reason after a space.
    failed_requests: list[str] = field(default_factory=list)
    # Navigation start to the end of the load event, in milliseconds (the page's own navigation timing
    # where it has it, else the time from Page.navigate to Page.loadEventFired).
    load_ms: float = 0.0


_IMAGES_JS = """
(async (timeoutMs) => {
  const images = Array.from(document.images);
  for (const img of images) {
    if (img.loading !== 'eager') img.loading = 'eager';
  }
  const done = () => images.every((img) => img.complete);
  const deadline = performance.now() + timeoutMs;
  while (!done() && performance.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  if (!done()) {
    // Some engines only start a lazy image once it nears the viewport: scroll each one into view.
    const x = window.scrollX, y = window.scrollY;
    for (const img of images) {
      if (img.complete) continue;
      img.scrollIntoView();
      await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 20)));
    }
    window.scrollTo(x, y);
    while (!done() && performance.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  }
  return images.map((img) => ({
    src: img.currentSrc || img.src,
    natural_width: img.naturalWidth,
    natural_height: img.naturalHeight,
    complete: img.complete,
  }));
})
"""

_CLICK_JS = """
((selector) => {
  const el = document.querySelector(selector);
  if (el === null) throw new Error('no element matches ' + selector);
  el.dispatchEvent(new MouseEvent('click', {bubbles: true, cancelable: true, composed: true, view: window}));
})
"""

_LOAD_MS_JS = """
(() => {
  const nav = performance.getEntriesByType('navigation')[0];
  return nav && nav.loadEventEnd > 0 ? nav.loadEventEnd - nav.startTime : null;
})()
"""


def _is_external(url: str) -> bool:
    return not url.startswith(LOCAL_SCHEMES)


def _remote_text(obj: dict[str, Any]) -> str:
    """A console argument (a CDP RemoteObject) as console.log would print it, roughly."""
    if "value" in obj:
        value = obj["value"]
        return value if isinstance(value, str) else json.dumps(value)
    if "unserializableValue" in obj:
        return str(obj["unserializableValue"])
    return str(obj.get("description", obj.get("type", "?")))


def _exception_text(details: dict[str, Any]) -> str:
    """An uncaught exception (CDP ExceptionDetails) as one message: "Uncaught Error: boom (url:line)"."""
    text = details.get("text", "Uncaught")
    exception = details.get("exception") or {}
    description = exception.get("description") or (exception.get("value") if "value" in exception else None)
    message = f"{text} {description}" if description is not None else text
    url = details.get("url")
    if url and "\n" not in message:  # a description with a stack trace names the place already
        message += f" ({url}:{details.get('lineNumber', 0) + 1})"
    return message


def _reader(fd: int, out: queue.Queue[dict[str, Any] | Exception | None]) -> None:
    """Read NUL-ended JSON messages from Chromium's fd 4 until EOF; put each on ``out``, then None."""
    parts: list[bytes] = []
    try:
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            while True:
                end = chunk.find(b"\0")
                if end < 0:
                    parts.append(chunk)
                    break
                parts.append(chunk[:end])
                out.put(json.loads(b"".join(parts)))
                parts = []
                chunk = chunk[end + 1 :]
    except (OSError, ValueError) as exc:
        out.put(exc)
    out.put(None)


def _exit_status(pid: int, wait: float = 0.0) -> str:
    """How the child ended ("exit code 1", "killed by signal 9"), or "still running" after ``wait`` seconds.

    The child is not reaped (see :func:`_exited`).
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return "exited"
        if info is not None:
            return (
                f"exit code {info.si_status}" if info.si_code == os.CLD_EXITED else f"killed by signal {info.si_status}"
            )
        if time.monotonic() >= deadline:
            return "still running"
        time.sleep(0.02)


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (its zombie keeps the process group id taken)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


class Browser:
    """One headless Chromium with one page, driven over the DevTools pipe; use it as a context manager.

    ``offline=True`` emulates a machine without network (Network.emulateNetworkConditions), so a
    report that needs the internet shows it by failing to load. Requests for URLs that are not
    file:, data:, blob: or about: are recorded in :attr:`external_requests` (all pages) and in each
    :class:`PageLoad`, online or not. ``width`` x ``height`` is the window and the viewport (CSS px).
    """

    def __init__(self, executable: str, *, offline: bool = True, width: int = 1280, height: int = 900) -> None:
        self.executable = executable
        self.offline = offline
        self.width = width
        self.height = height
        self.external_requests: list[str] = []
        self.profile_dir: Path | None = None
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._write_fd: int | None = None
        self._read_fd: int | None = None
        self._messages: queue.Queue[dict[str, Any] | Exception | None] = queue.Queue()
        self._reader_thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._waiting: set[int] = set()
        self._answers: dict[int, dict[str, Any]] = {}
        self._session: str | None = None
        self._closed_pipe = False
        self._page: PageLoad | None = None
        self._request_urls: dict[str, str] = {}  # requestId -> URL, for Network.loadingFailed
        self._loaded = False

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Browser:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start(self) -> None:
        self.profile_dir = Path(tempfile.mkdtemp(prefix="segpipe-chromium-"))
        args = [
            self.executable,
            "--headless=new",
            "--remote-debugging-pipe",
            "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={self.profile_dir / 'profile'}",
            f"--window-size={self.width},{self.height}",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-features=Translate,MediaRouter,OptimizationHints",
            "--hide-scrollbars",
            "--mute-audio",
            "--password-store=basic",
            "--use-mock-keychain",
            "--disable-breakpad",
            "--disable-crash-reporter",
        ]
        # Our ends get fds >= 10, so moving the child's ends onto 3 and 4 cannot clobber each other.
        to_chrome_r, to_chrome_w = (self._high_fd(fd) for fd in os.pipe())
        from_chrome_r, from_chrome_w = (self._high_fd(fd) for fd in os.pipe())

        def child_fds() -> None:  # runs in the child between fork and exec
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self._write_fd, self._read_fd = to_chrome_w, from_chrome_r  # closed by close(), whatever happens next
        self._stderr = open(self.profile_dir / "stderr.log", "w+b")  # noqa: SIM115 (closed in close())
        try:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
                pass_fds=(3, 4),
                preexec_fn=child_fds,  # noqa: PLW1509 (only dup2 runs there)
                start_new_session=True,  # its own process group, killed as a whole in close()
                env=self._child_env(),
            )
        finally:
            os.close(to_chrome_r)
            os.close(from_chrome_w)
        self.pid = self._proc.pid
        self._reader_thread = threading.Thread(
            target=_reader, args=(from_chrome_r, self._messages), name="chromium-devtools-reader", daemon=True
        )
        self._reader_thread.start()

        target = self._call("Target.createTarget", {"url": "about:blank"}, browser=True, timeout=STARTUP_TIMEOUT)
        attached = self._call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, browser=True)
        self._session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self._call(f"{domain}.enable")
        self._call(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )
        if self.offline:
            self._call(
                "Network.emulateNetworkConditions",
                {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
            )

    def _child_env(self) -> dict[str, str]:
        """Chromium's environment: nothing written outside the temporary folder (crash reports, dconf)."""
        assert self.profile_dir is not None
        env = dict(os.environ)
        # Crash reports go under the config home (~/.config/chromium), not under --user-data-dir.
        env["CHROME_CONFIG_HOME"] = str(self.profile_dir / "config")
        # GTK settings from memory: no ~/.cache/dconf when there is no session bus.
        env["GSETTINGS_BACKEND"] = "memory"
        return env

    @staticmethod
    def _high_fd(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    def close(self) -> None:
        """Stop Chromium (politely, then SIGKILL to its whole process group) and remove its profile."""
        proc = self._proc
        if proc is not None:
            polite = not self._closed_pipe and self._write_fd is not None
            if polite:
                try:
                    self._call("Browser.close", browser=True, timeout=CLOSE_TIMEOUT)
                except BrowserError:
                    polite = False  # hung or gone: no use waiting for it to exit
            deadline = time.monotonic() + (CLOSE_TIMEOUT if polite else 0.0)
            while not _exited(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            # The unreaped leader keeps the group id, so this reaches every helper process still alive.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            self._proc = None
        for name in ("_write_fd", "_read_fd"):
            fd = getattr(self, name)
            if fd is not None:
                if name == "_read_fd" and self._reader_thread is not None:
                    self._reader_thread.join(timeout=CLOSE_TIMEOUT)
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self.profile_dir is not None:
            shutil.rmtree(self.profile_dir, ignore_errors=True)

    # --- the protocol ------------------------------------------------------------------------

    def _stderr_tail(self) -> str:
        """The last lines Chromium wrote to stderr (less its D-Bus complaints, normal in a container)."""
        if self._stderr is None or self._stderr.closed:
            return ""
        self._stderr.flush()
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - 20 * _STDERR_TAIL))
        lines = self._stderr.read().decode("utf-8", "replace").splitlines()[1 if size > 20 * _STDERR_TAIL else 0 :]
        tail = "\n".join(line for line in lines if ":ERROR:dbus/" not in line and line.strip())[-_STDERR_TAIL:]
        return f"\nChromium's stderr ends with:\n{tail}" if tail else ""

    def _fail(self, message: str) -> BrowserError:
        return BrowserError(message + self._stderr_tail())

    def _send(self, message: dict[str, Any]) -> None:
        if self._write_fd is None or self._closed_pipe:
            raise self._fail(f"Chromium is not running (cannot send {message['method']})")
        data = json.dumps(message).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._write_fd, data) :]
        except OSError as exc:
            self._closed_pipe = True
            status = _exit_status(self._proc.pid, wait=1.0) if self._proc is not None else "not started"
            raise self._fail(f"Chromium closed the DevTools pipe ({status}, {exc}) at {message['method']}") from exc

    def _pump(self, deadline: float, awaited: str) -> None:
        """Take one message from Chromium (an answer or an event) before ``deadline``, or fail saying what was awaited."""
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise queue.Empty
            message = self._messages.get(timeout=remaining)
        except queue.Empty:
            raise self._fail(f"Chromium hung: no {awaited}") from None
        self._handle(message, awaited)

    def _drain(self) -> None:
        """Handle the messages already received, without waiting for more."""
        while True:
            try:
                message = self._messages.get_nowait()
            except queue.Empty:
                return
            self._handle(message, "the messages already sent")

    def _handle(self, message: dict[str, Any] | Exception | None, awaited: str) -> None:
        if message is None or isinstance(message, Exception):
            self._closed_pipe = True
            status = _exit_status(self._proc.pid, wait=1.0) if self._proc is not None else "not started"
            why = f", {message}" if message is not None else ""
            raise self._fail(f"Chromium closed the DevTools pipe ({status}{why}) while awaiting {awaited}")
        if "id" in message:
            if message["id"] in self._waiting:  # the answer to a call that timed out is dropped
                self._answers[message["id"]] = message
        elif message.get("sessionId") == self._session:
            self._on_event(message["method"], message.get("params", {}))

    def _call(
        self, method: str, params: dict[str, Any] | None = None, *, browser: bool = False, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Send one command (to the page session unless ``browser``) and return its result."""
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if not browser:
            message["sessionId"] = self._session
        self._waiting.add(msg_id)
        try:
            self._send(message)
            deadline = time.monotonic() + timeout
            while msg_id not in self._answers:
                self._pump(deadline, f"answer to {method} within {timeout:g} s")
        finally:
            self._waiting.discard(msg_id)
        answer = self._answers.pop(msg_id)
        if "error" in answer:
            error = answer["error"]
            raise BrowserError(f"{method} failed: {error.get('message')} {error.get('data', '')}".rstrip())
        result: dict[str, Any] = answer.get("result", {})
        return result

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        page = self._page
        if method == "Page.loadEventFired":
            self._loaded = True
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            self._request_urls[params.get("requestId", "")] = url
            if _is_external(url):
                self.external_requests.append(url)
                if page is not None:
                    page.external_requests.append(url)
        elif page is None:
            return
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(_remote_text(arg) for arg in params.get("args", []))
            page.console_errors.append(text if params["type"] == "error" else f"Assertion failed: {text}".rstrip())
        elif method == "Runtime.exceptionThrown":
            page.console_errors.append(_exception_text(params.get("exceptionDetails", {})))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            url = entry.get("url")
            page.console_errors.append(f"{entry.get('text', '')} ({url})" if url else entry.get("text", ""))
        elif method == "Network.loadingFailed":
            url = self._request_urls.get(params.get("requestId", ""), "?")
            page.failed_requests.append(f"{url} {params.get('errorText', '')}".rstrip())

    # --- what tests call ---------------------------------------------------------------------

    def open(self, path_or_url: str | os.PathLike[str], *, timeout: float = 30.0) -> PageLoad:
        """Navigate to a local file (a Path or a path string) or a URL and wait for its load event.

        Raises :class:`BrowserError` when the navigation fails (a missing file, say) or the load
        event does not come within ``timeout`` seconds.
        """
        text = os.fspath(path_or_url)
        is_url = isinstance(path_or_url, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", text) is not None
        url = text if is_url else Path(text).resolve().as_uri()
        self._drain()  # what the previous page reported so far stays with it
        self._page = page = PageLoad(url=url)
        self._request_urls = {}
        self._loaded = False
        started = time.monotonic()
        deadline = started + timeout
        result = self._call("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise BrowserError(f"could not open {url}: {result['errorText']}")
        while not self._loaded:
            self._pump(deadline, f"load event of {url} within {timeout:g} s")
        page.load_ms = (time.monotonic() - started) * 1000.0
        measured = self.evaluate(_LOAD_MS_JS, timeout=max(1.0, deadline - time.monotonic()))
        if isinstance(measured, (int, float)):
            page.load_ms = float(measured)
        return page

    def evaluate(self, expression: str, *, timeout: float = 30.0) -> Any:
        """The value of a JavaScript expression in the page (promises awaited, the result as JSON).

        Raises :class:`BrowserError` (an AssertionError) with the exception's text when the script
        throws or its promise rejects.
        """
        result = self._call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True, "userGesture": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"the script threw: {_exception_text(result['exceptionDetails'])}")
        return result.get("result", {}).get("value")

    def images(self, *, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every <img> of the page: ``src``, ``natural_width``, ``natural_height`` and ``complete``.

        Lazy images are made eager first (then scrolled into view if they still wait), and the
        answer comes once every image is complete (loaded or broken) or after ``timeout`` seconds.
        A broken image is complete with natural width 0.
        """
        images: list[dict[str, Any]] = self.evaluate(f"{_IMAGES_JS}({timeout * 1000.0:.0f})", timeout=timeout + 10.0)
        return images

    def click(self, selector: str) -> None:
        """Dispatch a click on the first element that matches the CSS ``selector`` (BrowserError if none does)."""
        self.evaluate(f"{_CLICK_JS}({json.dumps(selector)})")

    def screenshot(self, path: str | os.PathLike[str], *, full_page: bool = False) -> Path:
        """Write a PNG of the viewport, or with ``full_page`` of the whole scrollable page, to ``path``."""
        out = Path(path)
        if full_page:
            size = self.evaluate(
                "({w: Math.max(document.documentElement.scrollWidth, document.body ? document.body.scrollWidth : 0),"
                " h: Math.max(document.documentElement.scrollHeight, document.body ? document.body.scrollHeight : 0)})"
            )
            self._call(
                "Emulation.setDeviceMetricsOverride",
                {
                    "width": max(self.width, int(size["w"])),
                    "height": max(self.height, int(size["h"])),
                    "deviceScaleFactor": 1,
                    "mobile": False,
                },
            )
        try:
            shot = self._call("Page.captureScreenshot", {"format": "png"}, timeout=60.0)
        finally:
            if full_page:
                self._call(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
                )
        out.write_bytes(base64.b64decode(shot["data"]))
        return out
