"""survive_terminal(): a controller outlives a closed pipe, a closed pty and SIGHUP.

Every case runs in a child interpreter, so the test process's own streams and signal
dispositions are never touched. A child records that its work went on by writing a
marker file at the end, and any exception's traceback to ``<marker>.tb`` (its stderr
may be gone).
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

PREAMBLE = """
import logging, os, signal, sys, time, traceback
from pathlib import Path
marker = Path(sys.argv[1])
survive = sys.argv[2] == "survive"
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # not whatever the test runner inherited
logging.basicConfig(format="%(message)s")  # a StreamHandler on sys.stderr, as the CLI's
log = logging.getLogger("child")
from vmigrate.cli._common import err, out, survive_terminal
"""


def child(body: str, marker: Path, *, survive: bool = True,
          **popen: Any) -> subprocess.Popen[bytes]:
    script = PREAMBLE + "try:\n" + textwrap.indent(textwrap.dedent(body), "    ") + """
except BaseException:
    Path(str(marker) + ".tb").write_text(traceback.format_exc())
    raise
"""
    # buffered streams, as a controller has them (the exit flush cases depend on it)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.Popen([sys.executable, "-c", script, str(marker),
                             "survive" if survive else "plain"], env=env, **popen)


def traceback_of(marker: Path) -> str:
    tb = Path(str(marker) + ".tb")
    return tb.read_text() if tb.exists() else ""


CHATTER = """
if survive:
    survive_terminal()
for i in range(80):
    print(f"print {i}", flush=True)
    out.print(f"rich out {i}")
    err.print(f"rich err {i}")
    log.warning("log %d", i)
    sys.stderr.write(f"stderr {i}\\n")
    sys.stderr.flush()
    time.sleep(0.005)
print("left in the buffer for the flush at exit")
# a child process sharing our stdout and stderr writes into /dev/null, not a dead pipe
import subprocess
grandchild = subprocess.run([sys.executable, "-c", "print('x')"], check=False)
marker.write_text(f"done {grandchild.returncode}")
"""


def test_closed_pipes_do_not_stop_the_work(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    proc = child(CHATTER, marker, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() and proc.stderr.readline()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0, traceback_of(marker)
    assert marker.read_text() == "done 0"
    assert traceback_of(marker) == ""


def test_without_survive_terminal_a_closed_pipe_kills_the_work(tmp_path: Path) -> None:
    # proof that the test above can fail
    marker = tmp_path / "marker"
    proc = child(CHATTER, marker, survive=False, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() and proc.stderr.readline()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.wait(timeout=60) != 0
    assert not marker.exists()
    assert "BrokenPipeError" in traceback_of(marker)


EXIT_FLUSH = """
if survive:
    survive_terminal()
print("buffered, not flushed: the interpreter flushes it at exit")
sys.stdin.readline()  # the parent has closed our stdout by now
marker.write_text("done")
"""


def _exit_flush(tmp_path: Path, survive: bool) -> tuple[int, str]:
    marker = tmp_path / "marker"
    proc = child(EXIT_FLUSH, marker, survive=survive, stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    returncode = proc.wait(timeout=60)
    assert marker.read_text() == "done"
    return returncode, stderr


def test_exit_flush_into_a_closed_pipe_is_silent(tmp_path: Path) -> None:
    assert _exit_flush(tmp_path, survive=True) == (0, "")


def test_without_survive_terminal_the_exit_flush_complains(tmp_path: Path) -> None:
    returncode, stderr = _exit_flush(tmp_path, survive=False)
    assert returncode != 0 and "BrokenPipeError" in stderr


PTY_CHATTER = """
survive_terminal()
was_tty = sys.stdout.isatty()
print(f"isatty={was_tty}", flush=True)
for i in range(200):
    print(f"print {i}", flush=True)
    err.print(f"rich err {i}")
    log.warning("log %d", i)
    time.sleep(0.005)
    if not sys.stdout.isatty() and not sys.stderr.isatty():
        break
marker.write_text(f"{was_tty} {sys.stdout.isatty()} {sys.stderr.isatty()}")
"""


def test_closed_pty_does_not_stop_the_work(tmp_path: Path) -> None:
    # a terminal that went away: writes to the pty fail with EIO
    marker = tmp_path / "marker"
    master, slave = pty.openpty()
    proc = child(PTY_CHATTER, marker, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                 start_new_session=True)  # the pty is not its controlling terminal: no SIGHUP
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 30
    try:
        while b"isatty=True" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
    finally:
        os.close(master)
    assert b"isatty=True" in seen
    assert proc.wait(timeout=60) == 0, traceback_of(marker)
    # isatty() was true while the terminal worked, false once it was gone
    assert marker.read_text() == "True False False"


HANGUP = """
if survive:
    survive_terminal()
print("before the hang-up", flush=True)
os.kill(os.getpid(), signal.SIGHUP)
for i in range(20):
    print(f"after the hang-up {i}", flush=True)
    err.print(f"rich err {i}")
    log.warning("log %d", i)
    time.sleep(0.005)
marker.write_text("done")
"""


def _hangup(tmp_path: Path, body: str, survive: bool) -> tuple[int, str, Path]:
    marker = tmp_path / "marker"
    proc = child(body, marker, survive=survive, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    stdout, _stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout.decode(), marker


def test_sighup_is_survived_and_output_to_a_pipe_kept(tmp_path: Path) -> None:
    # the hang-up took the terminal, not the pipe (or file) the output goes to
    returncode, stdout, marker = _hangup(tmp_path, HANGUP, survive=True)
    assert returncode == 0, traceback_of(marker)
    assert marker.read_text() == "done"
    assert "before the hang-up" in stdout and "after the hang-up 19" in stdout


def test_sighup_drops_what_goes_to_the_terminal(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    master, slave = pty.openpty()
    proc = child(HANGUP, marker, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                 start_new_session=True)
    os.close(slave)
    seen = b""
    try:
        while proc.poll() is None or select.select([master], [], [], 0.2)[0]:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # EIO once the child closed its end
                    break
    finally:
        os.close(master)
    assert proc.wait(timeout=60) == 0, traceback_of(marker)
    assert marker.read_text() == "done"
    assert b"before the hang-up" in seen and b"after the hang-up" not in seen


def test_without_survive_terminal_sighup_kills(tmp_path: Path) -> None:
    returncode, _stdout, marker = _hangup(tmp_path, HANGUP, survive=False)
    assert returncode == -signal.SIGHUP
    assert not marker.exists()


def test_sighup_ignored_before_stays_ignored_and_output_kept(tmp_path: Path) -> None:
    # under nohup, SIGHUP is ignored already and output goes to a file: keep writing it
    body = "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n" + textwrap.dedent(HANGUP)
    returncode, stdout, marker = _hangup(tmp_path, body, survive=True)
    assert returncode == 0, traceback_of(marker)
    assert "after the hang-up 19" in stdout


WIRING = """
survive_terminal()
first = (sys.stdout, sys.stderr, signal.getsignal(signal.SIGHUP))
survive_terminal()
assert (sys.stdout, sys.stderr, signal.getsignal(signal.SIGHUP)) == first, "not idempotent"
assert sys.stdout is not sys.__stdout__ and sys.stderr is not sys.__stderr__
assert first[2] not in (signal.SIG_DFL, signal.SIG_IGN)
assert out.file is sys.stdout and err.file is sys.stderr
assert [h.stream for h in logging.getLogger().handlers] == [sys.stderr]
print("ok", flush=True)
out.print("rich ok")
err.print("rich err ok")
log.warning("log ok")
marker.write_text("done")
"""


def test_streams_consoles_and_log_handlers_are_rewired_once(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    proc = child(WIRING, marker, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, traceback_of(marker)
    assert stdout.decode().splitlines() == ["ok", "rich ok"]
    assert stderr.decode().splitlines() == ["rich err ok", "log ok"]
