"""Notebook budgets: every lecture and solution notebook must execute in at most 90 s on the
course's reference machine (2 CPU cores), and all of them together in at most 10 minutes. nbval
runs the notebooks; this plugin adds up the time of every cell of each notebook (kernel start
included), prints a table, slowest first, with the total, and fails the session when a notebook
or the total is over budget. COURSE_NOTEBOOK_BUDGET and COURSE_TOTAL_BUDGET override the 90 s and
600 s (e.g. on a slow laptop).
"""

from __future__ import annotations

import os
from collections import defaultdict

BUDGET_S = float(os.environ.get("COURSE_NOTEBOOK_BUDGET", "90"))
TOTAL_BUDGET_S = float(os.environ.get("COURSE_TOTAL_BUDGET", "600"))
_times: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _times[path] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _times:
        return
    tr = terminalreporter
    tr.write_sep("=", "notebook execution times (budget %.0f s each)" % BUDGET_S)
    for path, t in sorted(_times.items(), key=lambda kv: -kv[1]):
        flag = "  OVER BUDGET" if t > BUDGET_S else ""
        tr.write_line(f"{t:7.1f} s  {path}{flag}")
    total = sum(_times.values())
    flag = f"  OVER THE {TOTAL_BUDGET_S:.0f} s BUDGET" if total > TOTAL_BUDGET_S else f"  (budget {TOTAL_BUDGET_S:.0f} s)"
    tr.write_line(f"{total:7.1f} s  total ({len(_times)} notebooks){flag}")


def pytest_sessionfinish(session, exitstatus):
    over = [p for p, t in _times.items() if t > BUDGET_S]
    if over and session.exitstatus == 0:
        session.exitstatus = 1
        print(f"\nnotebooks over the {BUDGET_S:.0f} s budget: {', '.join(over)}")
    total = sum(_times.values())
    if total > TOTAL_BUDGET_S and session.exitstatus == 0:
        session.exitstatus = 1
        print(f"\nthe notebooks took {total:.0f} s together, over the {TOTAL_BUDGET_S:.0f} s budget")
