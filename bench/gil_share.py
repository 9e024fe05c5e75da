"""Who holds the GIL in a running server: a py-spy profile taken with `--gil --threads --format raw`, summed per
thread role, to tell whether the frontends' threads starve the engine loop (the loop holds the GIL to launch every
step; each request's thread takes it to encode, tokenize and send).

    py-spy record --gil --threads --subprocesses --nonblocking -r 200 --format raw -o spy.txt -- COMMAND
    python bench/gil_share.py spy.txt [--process "hub serve"] [--top 8]

Per process whose command line contains --process (default: every process): the samples that held the GIL by role
(`engine loop`: the scheduler's thread; `rpc workers`: gRPC's handler threads; `other`), their share, and each
role's heaviest leaf frames. With --gil, py-spy samples only the thread holding the GIL, so the shares are of the
time the GIL was held; --nonblocking keeps the sampled process running at full speed.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

ROLES = (("engine loop", "adapterhub-scheduler"), ("rpc workers", "adapterhub-rpc"))
_THREAD = re.compile(r"^thread \((?:0x[0-9a-fA-F]+|\d+)\):? ?(?P<name>.*)$")


def role_of(thread: str) -> str:
    for role, prefix in ROLES:
        if thread.startswith(prefix):
            return role
    return "other"


def parse(text: str) -> dict[str, dict[str, Counter]]:
    """{process: {role: Counter(leaf frame -> samples)}} from py-spy's raw (collapsed stack) output; the process
    is "" for a profile of one process (no --subprocesses)."""
    records: list[str] = []
    for line in text.splitlines():  # a command line in a process frame may span lines
        if line.startswith(("process ", "thread (")) or not records:
            records.append(line)
        else:
            records[-1] += " " + line
    out: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for record in records:
        stack, _, count = record.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        process = frames.pop(0) if frames[0].startswith("process ") else ""
        match = _THREAD.match(frames[0].strip()) if frames else None
        leaf = frames[-1] if len(frames) > 1 else "(no Python frame)"
        out[process][role_of(match.group("name") if match else "")][leaf] += int(count)
    return out


def report(parsed: dict[str, dict[str, Counter]], process: str, top: int) -> str:
    lines = []
    for name, roles in parsed.items():
        if process not in name:
            continue
        total = sum(sum(c.values()) for c in roles.values())
        lines.append(f"{name[:160] or 'the process'}: {total} samples holding the GIL")
        for role, frames in sorted(roles.items(), key=lambda item: -sum(item[1].values())):
            held = sum(frames.values())
            lines.append(f"  {role}: {held} samples, {held / total:.0%}")
            for leaf, n in frames.most_common(top):
                lines.append(f"      {n:6d}  {leaf[:140]}")
    return "\n".join(lines) or f"no process matching {process!r}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path, help="py-spy's raw output (--format raw)")
    ap.add_argument("--process", default="", help="only processes whose command line contains this")
    ap.add_argument("--top", type=int, default=8, help="leaf frames shown per role")
    args = ap.parse_args()
    print(report(parse(args.profile.read_text(errors="replace")), args.process, args.top))


if __name__ == "__main__":
    main()
