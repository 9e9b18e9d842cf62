"""Where a training step's time goes: XLA's ops from JAX's profiler, per step.

  python -m benchmarks.profile_step [--models=mlp] [--steps=80] [--top=12]

Runs our training step as benchmarks/throughput.py does (`--steps_per_call` steps per call),
records `--steps` of them with `jax.profiler.trace`, and lists the ops of the compiled program
that took the most time, per step: the op's name in the HLO, what it is (a dot, a fusion of
which kind), where it comes from (the JAX operation it was lowered from, e.g.
`transpose(jvp(MLP))/dense1/dot_general` is dense1's product in the backward pass) and its
milliseconds per step. Ops run concurrently where they do not depend on each other (two
products that each take 3 ms alone may both take 6 ms side by side), so the table also gives
each op's share of the wall time (time that n ops run together counts 1/n to each) and sorts
by it. XLA:CPU runs its generic (Eigen) dots asynchronously and the profiler's event covers
only their launch, so such an op is taken to end where the first op that uses its result
starts (failing that, where the runtime marks it done). Control flow (the loop over the steps
of a call, the branch that skips a non-finite update) is left out; the ops inside it are listed.
The trace is read as XLA:CPU writes it (one event per op, named after the HLO instruction);
GPU and TPU traces name their kernels otherwise and are not read here.
"""

from __future__ import annotations

import bisect
import collections
import glob
import gzip
import json
import re
import tempfile

from benchmarks.common import add_steps_per_call, parse, report, start_jax, timed

_CONTROL_FLOW = {"while", "conditional", "call", "async-start", "async-done"}
# XLA:CPU runs these asynchronously on Eigen's threads: their event covers only the launch
_ASYNC = {"dot", "convolution"}


def _type_end(text: str) -> int:
    """Where the result type at the start of an HLO instruction's right-hand side ends: at the
    first space, or for a tuple type, after its closing parenthesis."""
    if not text.startswith("("):
        return text.index(" ") if " " in text else len(text)
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i + 1
    return len(text)


def hlo_ops(text: str) -> dict[str, dict]:
    """Every instruction of a compiled HLO module's text: name -> opcode, result shape (layout
    dropped), fusion kind, the JAX operation it comes from (its `op_name` metadata) and the
    names it refers to (its operands, and the computations it calls)."""
    ops = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (.*)", line)
        if not m:
            continue
        name, rest = m.groups()
        end = _type_end(rest)
        shape, rest = re.sub(r"\{[^}]*\}", "", rest[:end]), rest[end:].lstrip()
        opcode = rest.split("(", 1)[0]
        kind = re.search(r'"fusion_config":\{"kind":"(\w+)"', rest) or re.search(r"kind=(\w+)",
                                                                                 rest)
        source = re.search(r'op_name="([^"]*)"', rest)
        ops[name] = {"opcode": opcode, "shape": shape, "kind": kind.group(1) if kind else "",
                     "source": source.group(1) if source else "",
                     "operands": re.findall(r"%([\w.\-]+)", rest)}
    return ops


def short_source(op_name: str) -> str:
    """The JAX operation without the jit/loop/branch wrappers around the step."""
    parts = op_name.split("/")
    keep = [p for p in parts if not re.match(
        r"(jit\(.*\)|while|body|closed_call|cond|branch_\d+_fun|checkpoint|remat)$", p)]
    return "/".join(keep)[-70:]


def _first_after(times: list[float], t: float) -> float | None:
    i = bisect.bisect_left(times, t)
    return times[i] if i < len(times) else None


def _traced_consumers(name: str, users: dict[str, list[str]], traced) -> set[str]:
    """The ops that use `name`'s result and appear in the trace, looking through those that do
    not (bitcasts, tuples); `users` maps each op to those that name it as an operand."""
    found, seen, todo = set(), {name}, list(users.get(name, ()))
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if user in traced:
            found.add(user)
        else:
            todo += users.get(user, ())
    return found


def op_times(trace_dir: str, ops: dict[str, dict], steps: int) -> dict[str, dict]:
    """Per step, for each op of `ops` found in the trace: its milliseconds (`ms`), its share of
    the wall time (`share_ms`: while n ops run at once, each is given 1/n of that time, so the
    shares add up to the time in which any op runs) and how often it ran (`calls`)."""
    files = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
    with gzip.open(files[0]) as f:
        trace = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    starts = collections.defaultdict(list)  # op -> its start times
    ends = collections.defaultdict(list)    # op -> its "end: <op>" events' times
    for e in trace:
        if e["name"] in ops:
            starts[e["name"]].append(e["ts"])
        elif e["name"].startswith("end: "):
            ends[e["name"][5:]].append(e["ts"])
    for times in [*starts.values(), *ends.values()]:
        times.sort()
    users = collections.defaultdict(list)
    for other, op in ops.items():
        for operand in op["operands"]:
            users[operand].append(other)
    consumers = {name: _traced_consumers(name, users, starts) for name in starts
                 if ops[name]["opcode"] in _ASYNC}
    events = []
    for e in trace:
        name = e["name"]
        if name not in ops or ops[name]["opcode"] in _CONTROL_FLOW:
            continue
        end = e["ts"] + e["dur"]
        if ops[name]["opcode"] in _ASYNC:
            # done by the time the first op that needs its result starts, and at the latest
            # when the runtime marks it done ("end: <name>", logged after starting those ops)
            later = [_first_after(starts[c], end) for c in consumers[name]]
            later.append(_first_after(ends[name], e["ts"]))
            end = max(end, min((t for t in later if t is not None), default=end))
        events.append((e["ts"], end, name))
    total, share, calls = collections.Counter(), collections.Counter(), collections.Counter()
    edges = sorted([(t0, 1, i) for i, (t0, _, _) in enumerate(events)]
                   + [(t1, -1, i) for i, (_, t1, _) in enumerate(events)])
    running, last = set(), None
    for t, change, i in edges:  # sweep over the start and end times
        if running and t > last:
            for j in running:
                share[events[j][2]] += (t - last) / len(running)
        last = t
        (running.add if change > 0 else running.discard)(i)
    for t0, t1, name in events:
        total[name] += t1 - t0
        calls[name] += 1
    return {name: {"ms": total[name] / steps / 1e3, "share_ms": share[name] / steps / 1e3,
                   "calls": calls[name] / steps} for name in total}


def main():
    def flags(p):
        p.add_argument("--top", type=int, default=12, help="ops listed per model")
        add_steps_per_call(p)

    args = parse(__doc__, models="mlp", extra=flags,
                 steps=(80, "steps recorded (rounded up to whole calls)"))
    jax = start_jax(args.cpu_devices)
    if jax.default_backend() != "cpu":
        raise SystemExit(f"profile_step reads XLA:CPU traces; JAX's backend here is "
                         f"{jax.default_backend()!r} (run with JAX_PLATFORMS=cpu to profile "
                         f"the CPU)")
    from benchmarks.throughput import ours

    k = max(args.steps_per_call, 1)
    steps = max(-(-args.steps // k) * k, k)
    columns = [("op", "op", "{}"), ("what", "what", "{}"), ("result", "shape", "{}"),
               ("from", "source", "{}"), ("ms/step", "ms", "{:.3f}"),
               ("share of wall ms/step", "share_ms", "{:.3f}"), ("runs/step", "calls", "{:.1f}")]
    everything = []
    for name in args.models.split(","):
        run_steps, _, _ = ours(jax, name, args.batch_size, args.image_size, k)
        run_steps(2 * k)  # compile and warm up
        wall = timed(run_steps, steps) / steps * 1e3
        ops = hlo_ops(run_steps.compiled_text())
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                run_steps(steps)
            times = op_times(trace_dir, ops, steps)
        rows = [{"model": name, "op": op, "what": ops[op]["opcode"] + (
                    f" ({ops[op]['kind']})" if ops[op]["kind"] else ""),
                 "shape": ops[op]["shape"], "source": short_source(ops[op]["source"]), **t}
                for op, t in sorted(times.items(), key=lambda kv: -kv[1]["share_ms"])]
        everything += rows
        print(f"\n{name}: {wall:.2f} ms per step unprofiled; profiled, some op runs during "
              f"{sum(r['share_ms'] for r in rows):.2f} ms per step, and the ops' own times add "
              f"up to {sum(r['ms'] for r in rows):.2f} ms\n")
        report(rows[:args.top], columns)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=2, allow_nan=False)


if __name__ == "__main__":
    main()
