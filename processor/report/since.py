"""``--since REV``: the Python functions changed between REV and HEAD, and how each behaved
in production before and after the version that shipped its change.

Changed functions: ``git diff -U0 REV HEAD`` over ``*.py``; each changed line range of
HEAD goes to the innermost function (decorators included) holding it, found with ``ast``
in HEAD's file; each removed range of REV likewise in REV's file. A function of REV's
file that HEAD's file no longer has (by qualified name) is *deleted*; one of HEAD's that
REV's did not have is *added*; the others touched are *modified*.

The version that shipped it: the newest commit of REV..HEAD that touched the function
(``git log -L``; for a deleted one, that touched its file) is the change. A version seen in
production contains the change when its ``vcs.ref.head.revision`` (or else a tag named
like its ``service.version``, ``v`` prefix or not) has that commit as an ancestor. The
version that shipped the change is the first one (by its first window anywhere in the
service) that contains it. *Before* is the location's figures in the last version it ran
that does not contain the change; *after*, in the first version containing it.
Figures come from ``{prefix}:versions:{key}`` (processor/sinks/versions.py).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

from processor.report.source import Function, SourceIndex, functions_of
from processor.report.store import EventRecord, Production, VersionRecord, Where


class GitError(Exception):
    """A git command failed; the message is git's."""


def git(repo: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, errors="replace")
    except FileNotFoundError:
        raise GitError("git is not installed") from None
    if check and p.returncode != 0:
        raise GitError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"git {args[0]} failed")
    return p


def verify_revision(repo: str, rev: str) -> str:
    """The commit REV names; GitError when it names none."""
    if rev.startswith("-"):
        raise GitError(f"not a revision: {rev!r}")
    p = git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}", check=False)
    if p.returncode != 0:
        raise GitError(f"unknown revision {rev!r} in {repo}")
    return p.stdout.strip()


@dataclass
class Change:
    path: str
    qualname: str
    status: str                   # added, modified, deleted
    function: Function            # at HEAD; at REV for a deleted one
    commit: str = ""              # the newest commit of REV..HEAD that changed it

    @property
    def dotted(self) -> str:
        return self.function.dotted


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


@dataclass
class _FileDiff:
    old: str | None
    new: str | None
    old_lines: list[tuple[int, int, bool]] = field(default_factory=list)  # (first, last, gap) removed at REV
    new_lines: list[tuple[int, int, bool]] = field(default_factory=list)  # (first, last, gap) added at HEAD


def _parse_diff(text: str) -> list[_FileDiff]:
    files: list[_FileDiff] = []
    cur: _FileDiff | None = None
    for line in text.splitlines():
        if line.startswith("diff --git "):
            cur = _FileDiff(None, None)
            files.append(cur)
        elif cur is None:
            continue
        elif line.startswith("--- "):
            cur.old = None if line[4:] == "/dev/null" else line[6:]
        elif line.startswith("+++ "):
            cur.new = None if line[4:] == "/dev/null" else line[6:]
        elif (m := _HUNK.match(line)):
            a, b = int(m.group(1)), int(m.group(2) or 1)
            c, d = int(m.group(3)), int(m.group(4) or 1)
            # A pure insertion (b = 0) comes after old line a; a pure deletion (d = 0) after new
            # line c: the function holding both neighbours changed.
            cur.old_lines.append((a, a + b - 1, False) if b else (a, a + 1, True))
            cur.new_lines.append((c, c + d - 1, False) if d else (c, c + 1, True))
    return files


def _innermost(functions: list[Function], first: int, last: int, pure_gap: bool) -> set[Function]:
    """Functions touched by lines first..last: for each line the innermost holding it; for a
    gap between two lines (pure insertion/deletion), the innermost holding both."""
    out = set()
    lines = [(first, last)] if pure_gap else [(n, n) for n in range(first, last + 1)]
    for lo, hi in lines:
        best = None
        for f in functions:
            if f.first_line <= lo and hi <= f.end_line and (best is None or f.first_line >= best.first_line):
                best = f
        if best is not None:
            out.add(best)
    return out


def _show(repo: str, rev: str, path: str) -> str:
    return git(repo, "show", f"{rev}:{path}").stdout


def _functions_at(repo: str, rev: str, path: str | None) -> list[Function]:
    if path is None:
        return []
    try:
        return functions_of(_show(repo, rev, path), path)
    except (SyntaxError, ValueError):
        return []


def changed_functions(repo: str, rev: str) -> list[Change]:
    base = verify_revision(repo, rev)
    diff = git(repo, "diff", "-U0", "--no-color", "--no-ext-diff", "-M", base, "HEAD", "--", "*.py").stdout
    changes: list[Change] = []
    for fd in _parse_diff(diff):
        old_fns, new_fns = _functions_at(repo, base, fd.old), _functions_at(repo, "HEAD", fd.new)
        old_names = {f.qualname for f in old_fns}
        new_by_name = {f.qualname: f for f in new_fns}
        touched_new: set[Function] = set()
        touched_old: set[Function] = set()
        for first, last, gap in fd.new_lines:
            touched_new |= _innermost(new_fns, first, last, gap)
        for first, last, gap in fd.old_lines:
            touched_old |= _innermost(old_fns, first, last, gap)
        by_name: dict[str, Change] = {}
        for f in sorted(touched_new, key=lambda f: f.line):
            status = "modified" if f.qualname in old_names else "added"
            by_name[f.qualname] = Change(fd.new, f.qualname, status, f)
        for f in new_fns:  # added without a hunk of their own inside them (whole file new, moves)
            if f.qualname not in old_names and f.qualname not in by_name:
                by_name[f.qualname] = Change(fd.new, f.qualname, "added", f)
        for f in sorted(touched_old, key=lambda f: f.line):
            if f.qualname in by_name:
                continue
            if f.qualname in new_by_name:
                nf = new_by_name[f.qualname]
                by_name[f.qualname] = Change(fd.new, f.qualname, "modified", nf)
            else:
                by_name[f.qualname] = Change(fd.old, f.qualname, "deleted", f)
        for c in by_name.values():
            if c.status == "deleted":
                log = git(repo, "log", "-1", "--format=%H", f"{base}..HEAD", "--", c.path).stdout
            else:
                fn = c.function
                log = git(repo, "log", "-s", "--format=%H", f"-L{fn.first_line},{fn.end_line}:{c.path}",
                          f"{base}..HEAD").stdout
            commits = log.split()
            c.commit = commits[0] if commits else ""
        changes.extend(sorted(by_name.values(), key=lambda c: (c.path, c.function.line)))
    return changes


# --- versions and their commits ----------------------------------------------------------------

class Versions:
    """Which production versions contain a commit, asked of git once per pair."""

    def __init__(self, repo: str):
        self.repo = repo
        self._commit: dict[tuple[str, str], str | None] = {}
        self._contains: dict[tuple[str, str], bool] = {}

    def commit_of(self, version: str, revision: str) -> str | None:
        k = (version, revision)
        if k not in self._commit:
            found = None
            for cand in ([revision] if revision else []) + ([version, f"v{version}"] if version else []):
                if cand.startswith("-"):
                    continue
                p = git(self.repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{cand}^{{commit}}",
                        check=False)
                if p.returncode == 0:
                    found = p.stdout.strip()
                    break
            self._commit[k] = found
        return self._commit[k]

    def contains(self, version: str, revision: str, commit: str) -> bool | None:
        """True/False, or None when git does not know the version."""
        at = self.commit_of(version, revision)
        if at is None or not commit:
            return None
        k = (commit, at)
        if k not in self._contains:
            p = git(self.repo, "merge-base", "--is-ancestor", commit, at, check=False)
            self._contains[k] = p.returncode == 0
        return self._contains[k]


@dataclass
class Behaviour:
    """One changed function in production."""
    change: Change
    where: Where | None                      # the production location (None: never seen)
    shipped_in: tuple[str, str] | None       # (service.version, revision) that shipped it
    before: VersionRecord | None
    after: VersionRecord | None
    events: list[tuple[str, EventRecord]]    # ("before" | "after" | "?", event)
    note: str = ""


def _first_seen_by_version(prod: Production, service: str, environment: str) -> dict[tuple[str, str], int]:
    """When each version of a service first served anything (its earliest window start)."""
    first: dict[tuple[str, str], int] = {}
    for key, recs in prod.versions.items():
        b = prod.baselines.get(key)
        if b is None or (b.where.service, b.where.environment) != (service, environment):
            continue
        for r in recs:
            k = (r.version, r.revision)
            first[k] = min(first.get(k, r.first_ms), r.first_ms)
    for e in prod.events:
        if (e.where.service, e.where.environment) == (service, environment) and e.version:
            k = (e.version, e.revision)
            first[k] = min(first.get(k, e.window_start_ms), e.window_start_ms)
    return first


def behaviours(changes: list[Change], prod: Production, head: SourceIndex, base: SourceIndex,
               versions: Versions) -> list[Behaviour]:
    """Each change with each production location that maps to it (or one without any)."""
    located: dict[tuple[str, str], list[Where]] = {}
    for key, where in prod.locations().items():
        _, _, fn = head.locate(where.function, where.file, where.line)
        if fn is None:
            _, _, fn = base.locate(where.function, where.file, where.line)
        if fn is not None:
            located.setdefault((fn.path, fn.qualname), []).append(where)
    out: list[Behaviour] = []
    for c in changes:
        wheres = located.get((c.path, c.qualname), [])
        if not wheres:
            out.append(Behaviour(c, None, None, None, None, [], "never seen in production"))
        for w in sorted(wheres, key=lambda w: (w.environment, w.service)):
            out.append(_behaviour(c, w, prod, versions))
    return out


def _behaviour(c: Change, w: Where, prod: Production, versions: Versions) -> Behaviour:
    first = _first_seen_by_version(prod, w.service, w.environment)
    containing = sorted((t, v) for v, t in first.items() if versions.contains(*v, c.commit))
    shipped = containing[0][1] if containing else None
    shipped_at = containing[0][0] if containing else None
    recs = prod.versions.get(w.key, [])
    before = after = None
    for r in recs:
        has = versions.contains(r.version, r.revision, c.commit)
        if has is False and (shipped_at is None or r.first_ms < shipped_at):
            if before is None or r.last_ms >= before.last_ms:
                before = r
        elif has and after is None:
            after = r  # recs are in order of first window: the first version with the change
    events = []
    for e in prod.events_of(w.key):
        has = versions.contains(e.version, e.revision, c.commit)
        side = "?" if has is None else ("after" if has else "before")
        events.append((side, e))
    note = ""
    if not c.commit:
        note = "no commit of the range touched it"
    elif shipped is None:
        known = [v for v in first if versions.commit_of(*v) is not None]
        note = ("no version seen in production contains the change yet" if known else
                "production versions carry no vcs.ref.head.revision and no tag is named like them")
    elif after is None:
        note = f"not called since {shipped[0] or shipped[1][:12]} shipped"
    return Behaviour(c, w, shipped, before, after, events, note)
