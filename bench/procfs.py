"""What the benchmarks read from /proc: a process's memory, its
descendants, and the PSS of a process tree (Linux only)."""

import os


def vm(pid, field):
    """A /proc/PID/status field in KiB (VmRSS, VmHWM), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree(roots):
    """Process ids of `roots` and all their descendants."""
    children = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                # The command name may hold spaces: fields after its ')'.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    seen, todo = set(), list(roots)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(children.get(p, []))
    return seen


def pss_kib(roots):
    """Summed PSS in KiB of `roots` and their descendants: pages that
    processes share (Postfix's) count once in all, not once each."""
    total = 0
    for pid in tree(roots):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total
