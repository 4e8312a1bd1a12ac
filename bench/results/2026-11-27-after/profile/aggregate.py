"""Top functions of a py-spy --format raw profile: own (leaf) and total (inclusive) share of samples.

    python aggregate.py relay_same_worker_native.txt [func|line] [N]

The *.top.txt files beside it are this script's output (line mode, top 30).
"""

from __future__ import annotations

import collections
import re
import sys


def key(frame: str, mode: str) -> str:
    match = re.match(r"(.*) \((.*?)(?::(\d+))?\)$", frame)
    if not match:
        return frame
    name, file, line = match.groups()
    if mode == "line" and line:
        return f"{name} ({file}:{line})"
    return f"{name} ({file})"


def main() -> None:
    path = sys.argv[1]
    mode = sys.argv[2] if len(sys.argv) > 2 else "func"
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    leaf_line: collections.Counter[str] = collections.Counter()
    samples = 0
    with open(path) as lines:
        for raw in lines:
            raw = raw.rstrip("\n")
            if not raw:
                continue
            stack, count_text = raw.rsplit(" ", 1)
            count = int(count_text)
            samples += count
            frames = stack.split(";")
            keys = [key(f, mode) for f in frames]
            own[keys[-1]] += count
            for k in set(keys):
                total[k] += count
            python = [f for f in frames if ".py:" in f]
            native = key(frames[-1], mode) if ".py" not in frames[-1] else "(python)"
            leaf_line[(python[-1] if python else "-") + "  ->  " + native] += count
    print("samples", samples)
    print("== own (leaf)")
    for k, v in own.most_common(top):
        print(f"{100 * v / samples:5.1f}%  {k}")
    print("== total (inclusive)")
    for k, v in total.most_common(45):
        print(f"{100 * v / samples:5.1f}%  {k}")
    print("== deepest python line -> native leaf")
    for k, v in leaf_line.most_common(30):
        print(f"{100 * v / samples:5.1f}%  {k}")


if __name__ == "__main__":
    main()
