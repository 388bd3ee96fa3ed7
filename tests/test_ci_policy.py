"""The CI cannot pass empty: the skip policy (tests/skip_policy.py) and the README's
test command (.ci/test_command), each checked on small made-up suites and READMEs."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

TESTS = Path(__file__).resolve().parent

SUITE = '''
import pytest

def test_passes():
    assert True

def test_skips():
    pytest.skip("needs an NPU")

@pytest.mark.xfail(reason="known bug 12", strict=True)
def test_xfails():
    assert False
'''


def _run_suite(tmp_path: Path, tests: str, allowlist: str, *args: str):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from skip_policy import (pytest_runtest_logreport, pytest_sessionfinish,
                                 pytest_terminal_summary)
    """))
    (tmp_path / "test_suite.py").write_text(tests)
    (tmp_path / "skips.txt").write_text(allowlist)
    env = {"DSFLOW_EXPECTED_SKIPS": str(tmp_path / "skips.txt"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "-p", "no:timeout", str(tmp_path), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)


ALL_LISTED = ("test_suite.py::test_skips | needs an NPU   # no NPU on CI\n"
              "# a comment line\n"
              "test_suite.py::test_x* | known bug\n")


def test_listed_skips_pass_and_the_counts_are_printed(tmp_path):
    r = _run_suite(tmp_path, SUITE, ALL_LISTED)
    assert r.returncode == 0, r.stdout
    assert ("collected 3, passed 1, skipped 1, xfailed 1, failed 0, expected skips 2"
            in r.stdout), r.stdout


@pytest.mark.parametrize("allowlist,needle", [
    ("test_suite.py::test_x* | known bug\n", "skipped but not listed"),
    ("test_suite.py::test_skips | needs an NPU\n", "xfailed but not listed"),
    # right test, wrong reason: a skip for another cause is not the expected one
    ("test_suite.py::test_skips | no GPU\ntest_suite.py::test_x* | known bug\n",
     "skipped but not listed"),
])
def test_an_unlisted_skip_or_xfail_fails_the_run(tmp_path, allowlist, needle):
    r = _run_suite(tmp_path, SUITE, allowlist)
    assert r.returncode == 1, r.stdout
    assert needle in r.stdout and "test_suite.py::" in r.stdout, r.stdout


def test_no_tests_fails_the_run(tmp_path):
    r = _run_suite(tmp_path, "x = 1\n", "")
    assert r.returncode != 0
    assert "no tests were collected" in r.stdout, r.stdout


def test_a_malformed_allowlist_line_is_named(tmp_path):
    r = _run_suite(tmp_path, SUITE, "test_suite.py::test_skips needs an NPU\n")
    assert r.returncode != 0
    assert "skips.txt:1: expected '<test id> | <reason text>'" in r.stdout + r.stderr


def test_a_selection_counts_only_what_it_selected(tmp_path):
    r = _run_suite(tmp_path, SUITE, ALL_LISTED, "-k", "passes")
    assert r.returncode == 0 and "collected 1, passed 1" in r.stdout, r.stdout


def test_the_repository_allowlist_parses():
    from skip_policy import ALLOWLIST, read_allowlist
    entries = read_allowlist(ALLOWLIST)
    assert entries and all(e.pattern.startswith("tests/") for e in entries)


# --- the README's test command -------------------------------------------------------

def _command(tmp_path: Path, readme: str) -> subprocess.CompletedProcess:
    (tmp_path / "README.md").write_text(readme)
    return subprocess.run([str(REPO / ".ci" / "test_command"), str(tmp_path / "README.md")],
                          capture_output=True, text=True, timeout=30)


def test_the_repository_readme_has_one_test_command():
    r = subprocess.run([str(REPO / ".ci" / "test_command"), str(REPO / "README.md")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("pytest -q tests")


MARK = "<!-- test-command: .ci/run runs the line below verbatim -->\n"


@pytest.mark.parametrize("readme,needle", [
    ("# no marker\n```sh\npytest\n```\n", "no <!-- test-command --> marker"),
    (MARK + "```sh\npip install .\npytest\n```\n", "has 2 lines"),
    (MARK + "```sh\n```\n", "has 0 lines"),
    (MARK + "```sh\npip install . && \\\n", "not closed"),
    (MARK + "```sh\npip install . && \\\n```\n", "line continuation"),
    (MARK + "text in between\n```sh\npytest\n```\n", "not followed by a ```sh block"),
    (MARK + "```sh\npytest\n```\n" + MARK + "```sh\npytest\n```\n", "more than one"),
])
def test_ci_refuses_a_test_block_it_cannot_run_whole(tmp_path, readme, needle):
    r = _command(tmp_path, readme)
    assert r.returncode == 1 and needle in r.stderr, r.stderr
    assert r.stdout == ""


def test_ci_reads_a_one_line_block(tmp_path):
    r = _command(tmp_path, "intro\n" + MARK + "\n```sh\npip install . && pytest -q\n```\n")
    assert r.returncode == 0 and r.stdout == "pip install . && pytest -q\n"


# --- .ci/run itself, on a copy with a made-up README ------------------------------------

def _ci_run(tmp_path: Path, block: str) -> subprocess.CompletedProcess:
    shutil.copytree(REPO / ".ci", tmp_path / ".ci")
    (tmp_path / "README.md").write_text(MARK + "```sh\n" + block + "```\n")
    return subprocess.run([str(tmp_path / ".ci" / "run")], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)


def test_ci_run_runs_the_one_line_whole(tmp_path):
    r = _ci_run(tmp_path, "touch first && touch second\n")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "first").exists() and (tmp_path / "second").exists()
    assert "+ touch first && touch second" in r.stdout and "exit status 0" in r.stdout


def test_ci_run_fails_on_pytest_exit_5(tmp_path):
    r = _ci_run(tmp_path, "exit 5\n")
    assert r.returncode == 5 and "no tests were collected" in r.stderr


def test_ci_run_runs_nothing_of_a_block_it_cannot_run_whole(tmp_path):
    r = _ci_run(tmp_path, "touch first\ntouch second\n")
    assert r.returncode == 1 and "has 2 lines" in r.stderr
    assert not (tmp_path / "first").exists()
