"""``views.png`` of bundle after bundle from one long-lived Slicer child process (a cohort run's renderer).

``write_views_png_isolated`` (``ctcdam.export.slicer_render``) starts Python, VTK and Slicer in a child for every
bundle: about 2.5 s of the ~5 s a bundle's views cost on the 2-core machine. ``ViewsRenderer`` keeps one child
(``python -m ctcdam.export.views_renderer``: one JSON request per stdin line, one reply line each) for all the
bundles a process writes; a request that crashes or outlasts the timeout costs that bundle its views.png, and
the child is replaced.
"""
from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from ctcdam import io
from ctcdam.export.slicer_render import child_environment, rendering_problem, write_views_png

log = logging.getLogger(__name__)

#: Prefix of the serving child's replies (anything else a library prints on stdout is ignored).
_REPLY = b"ctcdam-views "


class ViewsRenderer:
    """``views.png`` of bundle after bundle from one long-lived Slicer child process, started on entering; call it
    like ``start_views_png_isolated`` (its result waits: None, with one log line, when a view cannot be made).
    Use as a context manager.

    A request that crashes or outlasts ``timeout_s`` costs that bundle its views.png: the child is replaced.
    """

    def __init__(self, timeout_s: float = 180.0):
        self.timeout_s = timeout_s
        self._child: subprocess.Popen | None = None
        self._buffer = b""
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._requests = 0
        self._pending = False

    def __enter__(self) -> Self:
        self._scratch = tempfile.TemporaryDirectory(prefix="ctcdam-views-")
        if rendering_problem() is None:
            self._start()  # now: Slicer's start-up overlaps the caller's own (imports, the model, the first scan)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
        if self._scratch is not None:
            self._scratch.cleanup()

    def _start(self) -> subprocess.Popen:
        self._buffer = b""
        self._child = subprocess.Popen(
            [sys.executable, "-m", "ctcdam.export.views_renderer"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_environment(), bufsize=0)
        return self._child

    def _stop(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        try:
            child.stdin.close()
            child.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            child.kill()
            child.wait()

    def _reply(self, child: subprocess.Popen) -> dict | None:
        """The child's next reply, or None when it died or ran out of time."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            line, newline, rest = self._buffer.partition(b"\n")
            if newline:
                self._buffer = rest
                if line.startswith(_REPLY):
                    return json.loads(line[len(_REPLY):])
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([child.stdout], [], [], remaining)[0]:
                return None
            chunk = os.read(child.stdout.fileno(), 65536)
            if not chunk:
                return None
            self._buffer += chunk

    def __call__(self, mrb: Path, path: Path, caption: str = "") -> Callable[[], Path | None]:
        """Ask the child to render ``mrb``'s views and return the call that waits for them and publishes ``path``
        (None, with one log line, when they cannot be made). One request at a time: wait before the next."""
        problem = rendering_problem()
        if problem:
            log.info("views.png skipped: %s", problem)
            return lambda: None
        if self._pending:
            raise RuntimeError("ViewsRenderer: the previous views.png was not waited for")
        child = self._child if self._child is not None and self._child.poll() is None else self._start()
        self._requests += 1
        rendered = Path(self._scratch.name) / f"views-{self._requests}.png"
        request = {"mrb": str(Path(mrb).resolve()), "png": str(rendered), "caption": caption}
        try:
            child.stdin.write((json.dumps(request) + "\n").encode())
            sent = True
        except OSError:
            sent = False
        self._pending = True

        def finish() -> Path | None:
            self._pending = False
            reply = self._reply(child) if sent else None
            if reply is None:
                log.warning("views.png skipped: Slicer's rendering process stopped or took more than %.0f s",
                            self.timeout_s)
                self._stop()
                return None
            if not reply.get("ok") or not rendered.is_file():
                log.warning("views.png skipped: Slicer's rendering failed (%s)", reply.get("error", "no image"))
                return None
            try:
                return io.write_bytes(path, rendered.read_bytes())
            finally:
                rendered.unlink(missing_ok=True)

        return finish


def serve() -> int:
    """Render one request per stdin line ({"mrb", "png", "caption"}), one reply line each, until stdin closes."""
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            write_views_png(Path(request["mrb"]), Path(request["png"]), request.get("caption", ""))
            reply = {"ok": True}
        except Exception as error:  # one bundle's failure must not end the renderer of the others
            reply = {"ok": False, "error": f"{type(error).__name__}: {' '.join(str(error).split())}"}
        sys.stdout.buffer.write(_REPLY + json.dumps(reply).encode() + b"\n")
        sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    from ctcdam.cli.common import exit_process

    exit_process(serve())
