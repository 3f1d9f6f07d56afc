"""Each process launch in the test suite has a rendezvous port of its own.

The suite runs on two workers at once, and a launch whose port another launch is using at the same
time joins that one's store: a hang, or a run in another run's world. Ports are written as literals
(29500-29999) in the test files; none may appear twice."""

import re
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PORT = re.compile(r"\b29[5-9]\d\d\b")


def test_no_port_is_used_by_two_launches():
    found = Counter()
    where = {}
    for path in sorted(TESTS.glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        for number, line in ((m.group(), i) for i, text in enumerate(path.read_text().splitlines(), 1)
                             for m in PORT.finditer(text)):
            found[number] += 1
            where.setdefault(number, []).append(f"{path.name}:{line}")
    assert len(found) >= 10  # the launches of test_deepspeed, test_world, test_multinode, ... were seen
    assert not {n: where[n] for n, count in found.items() if count > 1}
