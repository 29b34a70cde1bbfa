"""Who owns a code location: CODEOWNERS rules applied to an event's ``code.file.path``.

Parsing and matching are the ``codeowners`` package's (GitHub's and GitLab's pattern rules,
last matching rule wins). What this module adds is turning the path a span reports into a
path relative to the repository, which is what CODEOWNERS patterns describe:

- a relative path is matched as it is (a leading ``./`` dropped);
- an absolute path under the repository root (the directory holding the CODEOWNERS file,
  or its parent when that directory is ``.github``, ``.gitlab`` or ``docs``) loses that root;
- any other absolute path (a service running from ``/app`` or ``/srv/shop``) loses its
  leading directories up to the first one that a rule names at the top of the repository
  (``/shop/cart.py`` or ``shop/payments/*`` name ``shop``): ``/srv/app/shop/cart.py`` is
  matched as ``shop/cart.py``;
- failing that, the path without its leading ``/``, which rules such as ``*.py`` or
  ``docs/`` (a directory of that name anywhere) still match.

Owners are returned space-separated as CODEOWNERS writes them, empty when no rule matches.
Lookups are cached per path.

>>> owners = Owners("* @acme/everyone\\n/shop/payments/ @acme/payments @alice\\n")
>>> owners.of("shop/payments/charge.py")
'@acme/payments @alice'
>>> owners.of("/srv/app/shop/payments/charge.py")
'@acme/payments @alice'
>>> owners.of("shop/cart.py")
'@acme/everyone'
"""

from __future__ import annotations

import functools
import os
import re

from codeowners import CodeOwners, parse_owner

_ROOT_SUBDIRS = (".github", ".gitlab", "docs")  # where GitHub and GitLab also look for the file
_GLOB = re.compile(r"[*?\[\\]")
_ABSOLUTE = re.compile(r"/|[A-Za-z]:/")  # POSIX, or a Windows drive (after \ became /)


class Owners:
    """CODEOWNERS rules, and the owners of file paths as spans report them."""

    def __init__(self, text: str, root: str | None = None, cache_size: int = 65536):
        self.rules = CodeOwners(text)  # raises ValueError on a broken pattern
        self.root = root.rstrip("/") if root else None
        self.top_level = _top_level_names(text)
        # A bounded cache: file paths come from the senders' spans.
        self.of = functools.lru_cache(maxsize=cache_size)(self._of)

    @classmethod
    def from_file(cls, path: str) -> "Owners":
        """Read and check a CODEOWNERS file; ValueError says what is wrong, and where."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read {path!r}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path!r} is not UTF-8 text") from None
        check(text, path)
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.basename(directory) in _ROOT_SUBDIRS:
            directory = os.path.dirname(directory)
        try:
            return cls(text, root=directory)
        except ValueError as e:
            raise ValueError(f"{path!r}: {e}") from None

    def relative(self, file_path: str) -> str:
        """The path that CODEOWNERS patterns are matched against (see the module's rule)."""
        p = file_path.replace("\\", "/")
        while p.startswith("./"):
            p = p[2:]
        if not _ABSOLUTE.match(p):
            return p
        if self.root and p.startswith(self.root + "/"):
            return p[len(self.root) + 1:]
        parts = p.split("/")
        for i, part in enumerate(parts[:-1]):
            if part in self.top_level:
                return "/".join(parts[i:])
        return p.lstrip("/")

    def _of(self, file_path: str) -> str:
        if not file_path:
            return ""
        return " ".join(owner for _, owner in self.rules.of(self.relative(file_path)))


def check(text: str, where: str) -> None:
    """Every rule's owners must be @user, @org/team or an e-mail address: the package skips
    anything else silently, so a typo would quietly leave files without owners."""
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#") or line.startswith(("[", "^[")):
            continue
        for token in line.replace("\\ ", "_").split()[1:]:
            if token.startswith("#"):
                break  # a trailing comment
            if parse_owner(token) is None:
                raise ValueError(f"{where} line {number}: {token!r} is not an owner "
                                 "(@user, @org/team or an e-mail address)")


def _top_level_names(text: str) -> frozenset[str]:
    """First directories of the rules anchored at the repository's top (``/shop/...``,
    ``shop/cart.py``): where an absolute path is cut to become relative."""
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "[", "^[")):
            continue
        pattern = line.split()[0]
        body = pattern.strip("/")
        if "/" not in body and not pattern.startswith("/"):
            continue  # "cart.py", "shop/": match at any depth, name no top-level directory
        first = body.split("/")[0]
        if first and not _GLOB.search(first):
            names.add(first)
    return frozenset(names)
