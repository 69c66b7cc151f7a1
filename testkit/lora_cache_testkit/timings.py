"""The wall time of each test group (a test file) per host, from pytest's JUnit XML reports
(a test's time there is its setup, call and teardown, so a module's or the session's shared
fixtures count in the group whose test first used them).

    python -m lora_cache_testkit.timings HOST=REPORT.xml [HOST=REPORT.xml ...]
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple


class Group(NamedTuple):
    host: str
    name: str
    tests: int
    failed: int
    skipped: int
    seconds: float


def groups(host: str, report: Path) -> list[Group]:
    rows: dict[str, list] = {}
    for case in ET.parse(report).iter("testcase"):
        name = case.get("classname", "").rsplit(".", 1)[-1] or case.get("name", "?")
        row = rows.setdefault(name, [0, 0, 0, 0.0])
        row[0] += 1
        row[1] += any(case.find(tag) is not None for tag in ("failure", "error"))
        row[2] += case.find("skipped") is not None
        row[3] += float(case.get("time") or 0.0)
    return [Group(host, name, *row) for name, row in rows.items()]


def table(all_groups: list[Group]) -> str:
    lines = [f"{'host':<8} {'group':<28} {'tests':>5} {'failed':>6} {'skipped':>7} {'seconds':>8}"]
    for host in dict.fromkeys(g.host for g in all_groups):
        mine = [g for g in all_groups if g.host == host]
        for g in mine:
            lines.append(f"{g.host:<8} {g.name:<28} {g.tests:>5} {g.failed:>6} {g.skipped:>7} {g.seconds:>8.1f}")
        lines.append(f"{host:<8} {'(all)':<28} {sum(g.tests for g in mine):>5} {sum(g.failed for g in mine):>6} "
                     f"{sum(g.skipped for g in mine):>7} {sum(g.seconds for g in mine):>8.1f}")
    lines.append("(skipped counts expected failures too)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    found = []
    for arg in argv:
        host, _, path = arg.partition("=")
        if Path(path).is_file():
            found += groups(host, Path(path))
        else:
            print(f"[timings] no report for {host} ({path})")
    print(table(found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
