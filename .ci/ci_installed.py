"""pytest plugin for CI (``-p ci_installed``): fail the run unless ``pml_ms_plus`` is the installed wheel.

Checked when the session starts and again when it ends (after every test module has imported the
package), so a test run that picked up the source tree instead of site-packages cannot pass.
"""

import sys
import sysconfig

import pytest

SITE = sysconfig.get_paths()["purelib"]


def _where(when: str) -> str:
    import pml_ms_plus  # noqa: F401

    module = sys.modules["pml_ms_plus"]
    path = module.__file__ or ""
    if not path.startswith(SITE):
        raise pytest.UsageError(f"{when}: pml_ms_plus imported from {path}, not from {SITE}")
    return f"{path} (version {module.__version__})"


def pytest_sessionstart(session: pytest.Session) -> None:
    _where("session start")


_summary = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    try:
        _summary.append("pml_ms_plus under test: " + _where("session end"))
    except pytest.UsageError as err:
        _summary.append(f"ERROR {err}")
        session.exitstatus = pytest.ExitCode.USAGE_ERROR


def pytest_terminal_summary(terminalreporter: "pytest.TerminalReporter") -> None:
    for line in _summary:
        terminalreporter.write_line(line)
