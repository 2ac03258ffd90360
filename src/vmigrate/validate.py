"""The allowed forms of names, addresses, paths and commands: validation at the edge.

vmigrate runs as root on every host it reaches, so every field of a VM spec and of the
inventory is checked against a narrow form before anything starts (``SECURITY`` in
DESIGN.md: validate at the edge, quote once). These checks are pure and raise
:class:`ValueError` (pydantic validators turn it into the model's error, which the
callers translate into :class:`~vmigrate.errors.SpecError` or
:class:`~vmigrate.errors.ConfigError` naming the field).

The forms are deliberately narrower than what the kernel or QEMU accept:

* **names** (VMs, hosts, pools, labs): 1-63 of letters, digits, ``. _ -``, starting
  with a letter or digit;
* **interface names** (bridges, network namespaces): 1-15 of letters, digits,
  ``. _ -``, starting with a letter, digit or ``_`` (Linux allows 15 bytes);
* **paths**: absolute and normalised (no ``.``/``..`` component, no ``//``, no trailing
  ``/``), at most 4095 bytes and 255 bytes per component, made of letters, digits (any
  script) and ``_ . - + @ % = , : ~ /`` only: no whitespace, no control character, no
  quote and no shell metacharacter, even though vmigrate never hands a path to a shell
  as text. A comma is allowed: :func:`vmigrate.qemu.argv.qemu_value` doubles it inside
  QEMU options;
* **addresses**: an IP address, or a DNS host name (RFC 1123 labels);
* **commands** (``qemu_binary``, the first word of ``vmigrate_command``): a bare
  command name or an absolute path;
* **free text** (a kernel command line, one argv word): printable, no control
  characters, bounded length;
* **name patterns** (``[tiers.X]`` and ``[groups.X]`` ``vms``): fnmatch globs over VM
  names, matched case-sensitively by :func:`name_matches`, the one matcher of both.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Iterable
from fnmatch import fnmatchcase

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
IFNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
COMMAND_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
#: a glob over names: name characters and fnmatch's ``* ? [ ] !``
GLOB_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,128}")
#: punctuation a path may hold besides letters and digits
PATH_PUNCT = frozenset("_.-+@%=,:~/")
MAX_PATH = 4095
MAX_COMPONENT = 255
MAX_TEXT = 4096


def printable(text: str) -> str:
    """``text`` for a one-line message: every character that is not printable (a newline,
    NUL, a control character) written as its escape, as ``repr`` would."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _show(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def check_name(value: str, what: str = "name") -> str:
    """``value`` if it is a name (see the module docstring), else :class:`ValueError`."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} must be 1-63 characters of letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit; got {_show(str(value))}")
    return value


def check_ifname(value: str, what: str = "interface name") -> str:
    """``value`` if it is a network interface (or namespace) name, else ValueError."""
    if not isinstance(value, str) or not IFNAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} must be 1-15 characters of letters, digits, '.', '_' or '-', not "
            f"starting with '.' or '-'; got {_show(str(value))}")
    return value


def check_user(value: str) -> str:
    """``value`` if it is a POSIX user name, else ValueError."""
    if not isinstance(value, str) or not USER_RE.fullmatch(value):
        raise ValueError(f"not a user name: {_show(str(value))}")
    return value


def check_address(value: str) -> str:
    """``value`` if it is an IP address or a DNS host name, else ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError("an address is needed")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"not an IP address or a host name: {_show(value)}")
    return value


def check_ip(value: str) -> str:
    """``value`` if it is an IP address (v4 or v6), else ValueError."""
    try:
        ipaddress.ip_address(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an IP address: {_show(str(value))}") from exc
    return value


def path_problem(value: str) -> str | None:
    """Why ``value`` is not an allowed path, or None when it is one."""
    if not isinstance(value, str) or not value:
        return "an absolute path is needed"
    if not value.startswith("/"):
        return "must be absolute"
    bad = sorted({c for c in value if not (c.isalnum() or c in PATH_PUNCT)})
    if bad:
        return "may not contain " + " ".join(
            repr(c) if c.isprintable() and not c.isspace() else f"U+{ord(c):04X}"
            for c in bad[:5])
    try:
        encoded = value.encode()
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if len(encoded) > MAX_PATH:
        return f"is longer than {MAX_PATH} bytes"
    if value != "/" and (posixpath.normpath(value) != value or value.startswith("//")):
        return "must be normalised (no '.' or '..' component, no '//', no trailing '/')"
    if any(len(part.encode()) > MAX_COMPONENT for part in value.split("/")):
        return f"has a component longer than {MAX_COMPONENT} bytes"
    return None


def check_path(value: str, what: str = "path") -> str:
    """``value`` if it is an allowed absolute path (module docstring), else ValueError."""
    problem = path_problem(value)
    if problem is not None:
        raise ValueError(f"{what} {problem}: got {_show(str(value))}")
    return value


def check_command(value: str, what: str = "command") -> str:
    """``value`` if it is a bare command name or an allowed absolute path."""
    if isinstance(value, str) and value.startswith("/"):
        return check_path(value, what)
    if not isinstance(value, str) or not COMMAND_RE.fullmatch(value):
        raise ValueError(f"{what} must be a command name or an absolute path; got "
                         f"{_show(str(value))}")
    return value


def text_problem(value: str, *, limit: int = MAX_TEXT) -> str | None:
    """Why ``value`` is not allowed free text (printable, bounded), or None."""
    if not isinstance(value, str):
        return "must be text"
    if len(value) > limit:
        return f"is longer than {limit} characters"
    bad = sorted({c for c in value if not c.isprintable()})
    if bad:
        return "may not contain control characters (" + " ".join(
            f"U+{ord(c):04X}" for c in bad[:5]) + ")"
    try:
        value.encode()
    except UnicodeEncodeError:
        return "is not valid Unicode"
    return None


def check_text(value: str, what: str = "text", *, limit: int = MAX_TEXT) -> str:
    """``value`` if it is printable text of at most ``limit`` characters."""
    problem = text_problem(value, limit=limit)
    if problem is not None:
        raise ValueError(f"{what} {problem}: got {_show(str(value))}")
    return value


def check_word(value: str, what: str = "argument") -> str:
    """One word of an argv: non-empty printable text (spaces allowed: it is passed as a
    word, never split)."""
    if isinstance(value, str) and not value:
        raise ValueError(f"{what} may not be empty")
    return check_text(value, what, limit=MAX_PATH)


def check_glob(value: str, what: str = "name pattern") -> str:
    """``value`` if it is a glob over names (name characters and ``* ? [ ] !``, 1-128)."""
    if not isinstance(value, str) or not GLOB_RE.fullmatch(value):
        raise ValueError(
            f"{what} must be 1-128 characters of letters, digits, '.', '_', '-' and the "
            f"wildcards '*', '?', '[...]'; got {_show(str(value))}")
    return value


def name_matches(name: str, globs: Iterable[str]) -> bool:
    """Whether ``name`` matches one of ``globs`` (fnmatch, case-sensitive): the one
    matcher of VM name patterns, for tiers and groups alike."""
    return any(fnmatchcase(name, glob) for glob in globs)
