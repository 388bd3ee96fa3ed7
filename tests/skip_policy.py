"""A test run cannot pass empty: every test that did not pass must be an expected skip.

Hooks imported by tests/conftest.py (pytest finds them by name there). At the end of a
run they print the counts (collected, passed, skipped, xfailed, failed) and fail the
run (exit status 1) when

- a test was skipped or xfailed that tests/expected_skips.txt does not list (by test id
  and reason), or
- fewer tests passed than were collected, minus the listed skips and xfails, or
- nothing was collected (pytest's own exit 5, kept as a failure).

tests/expected_skips.txt holds one expected skip a line:

    <test id; `*` matches any text> | <text the skip reason contains>   # comment

e.g. `tests/test_x.py::test_y[*] | no CPU kernel`. Adding a skip to the suite is one
line there, with its reason. Set DSFLOW_EXPECTED_SKIPS to read another file (the
policy's own tests do).
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ALLOWLIST = Path(__file__).with_name("expected_skips.txt")


@dataclass(frozen=True)
class ExpectedSkip:
    pattern: str   # test node id; `*` matches any text, brackets are literal
    reason: str    # a substring of the skip/xfail reason
    line: int

    def matches(self, nodeid: str, reason: str) -> bool:
        # `*` matches any text; brackets are literal (parametrized ids hold them)
        literal = self.pattern.replace("[", "[[]")
        return fnmatch.fnmatchcase(nodeid, literal) and self.reason in reason


def read_allowlist(path: Path) -> list[ExpectedSkip]:
    """The allowlist's entries; a malformed line is a usage error naming it."""
    entries = []
    if not path.is_file():
        return entries
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not text:
            continue
        pattern, sep, reason = (s.strip() for s in text.partition("|"))
        if not sep or not pattern or not reason:
            raise pytest.UsageError(f"{path}:{n}: expected '<test id> | <reason text>', "
                                    f"got {raw!r}")
        entries.append(ExpectedSkip(pattern, reason, n))
    return entries


@dataclass
class Tally:
    passed: set = field(default_factory=set)
    failed: set = field(default_factory=set)
    not_run: dict = field(default_factory=dict)   # nodeid -> (outcome, reason)

    def record(self, report) -> None:
        nodeid = report.nodeid
        if hasattr(report, "wasxfail"):
            if report.skipped:
                self.not_run[nodeid] = ("xfailed", str(report.wasxfail))
            elif report.passed and report.when == "call":  # xpass (non-strict)
                self.not_run[nodeid] = ("xpassed", str(report.wasxfail))
            return
        if report.failed:
            self.failed.add(nodeid)
            self.passed.discard(nodeid)
        elif report.skipped:
            self.not_run[nodeid] = ("skipped", _skip_reason(report))
        elif report.when == "call" and report.passed and nodeid not in self.failed:
            self.passed.add(nodeid)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


_TALLY = Tally()


def pytest_runtest_logreport(report) -> None:
    _TALLY.record(report)


def _allowlist_path() -> Path:
    return Path(os.environ.get("DSFLOW_EXPECTED_SKIPS") or ALLOWLIST)


def _verdict(session) -> tuple[list[str], dict]:
    """(problems, counts) of the finished run."""
    allow = read_allowlist(_allowlist_path())
    collected = session.testscollected
    unexpected = [(nodeid, outcome, reason) for nodeid, (outcome, reason)
                  in sorted(_TALLY.not_run.items())
                  if outcome == "xpassed" or not any(e.matches(nodeid, reason) for e in allow)]
    expected = len(_TALLY.not_run) - len(unexpected)
    counts = {"collected": collected, "passed": len(_TALLY.passed),
              "skipped": sum(o == "skipped" for o, _ in _TALLY.not_run.values()),
              "xfailed": sum(o == "xfailed" for o, _ in _TALLY.not_run.values()),
              "failed": len(_TALLY.failed), "expected skips": expected}
    problems = [f"{outcome} but not listed in {_allowlist_path().name}: {nodeid} "
                f"({reason})" for nodeid, outcome, reason in unexpected]
    if collected == 0:
        problems.append("no tests were collected")
    elif counts["passed"] < collected - expected and not session.shouldstop \
            and not session.shouldfail:
        problems.append(f"only {counts['passed']} of {collected} collected tests passed "
                        f"({expected} expected skips)")
    return problems, counts


def pytest_sessionfinish(session, exitstatus) -> None:
    if (getattr(session.config, "workerinput", None) is not None  # xdist worker
            or session.config.option.collectonly):
        return
    problems, counts = _verdict(session)
    session.config._dsflow_verdict = (problems, counts)
    if problems and session.exitstatus == 0 or counts["collected"] == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    problems, counts = getattr(config, "_dsflow_verdict", ([], {}))
    if not counts:
        return
    tr = terminalreporter
    tr.section("dsflow test counts")
    tr.line(", ".join(f"{k} {v}" for k, v in counts.items()))
    for problem in problems:
        tr.line(f"FAIL: {problem}", red=True)
