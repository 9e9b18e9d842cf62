"""Every `python -m` command in README.md and docs/*.md names a real entry point and real flags.

Nothing is trained: one subprocess imports each documented module (absl keeps its flags in one
global registry and several experiments define --config and --workdir, so they cannot share this
process) and reports the flags it defines; for benchmarks, the argparse parser that
`benchmarks.common.parse` builds. The commands are then checked here: the module is an entry
point, every --flag exists, every --config.a.b override names a field of the config file the
command passes (or of the flag's default file), and enum values are among those allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Modules that are not ours: the commands that install the package and run the tests.
SKIPPED = {"pytest", "venv", "pip"}
# absl defines these only once app.run starts; argparse defines -h/--help itself.
ABSL_HELP = {"help", "helpfull", "helpshort", "helpxml", "h", "?"}
SEPARATORS = {"&&", "||", ";", "|", "&"}

# The bogus commands of the tests below name these modules; they are imported with the rest.
CHECKER_PROBES = ("experiments.no_such_entry_point", "dlassign.errors", "experiments.train",
                  "experiments.main", "benchmarks.step")


@dataclasses.dataclass(frozen=True)
class Command:
    where: str  # file:line
    module: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: python -m {self.module} {' '.join(self.args)}".rstrip()


# ----------------------------------------------------------------------------- extraction


def _shell_commands(text: str, where: str) -> list[Command]:
    """The `python -m MODULE ARGS` commands of shell text (continuations already joined)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError as e:  # an unclosed quote
        return [Command(where, f"<unparsable: {e}>", ())]
    segments, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    found = []
    for seg in segments:
        for i in range(len(seg) - 2):
            if re.fullmatch(r"(.*/)?python3?", seg[i]) and seg[i + 1] == "-m":
                # Usage lines write optional flags in brackets: [--rounds=2].
                args = tuple(t.strip("[]") for t in seg[i + 3:] if t.strip("[]"))
                found.append(Command(where, seg[i + 2], args))
                break
    return found


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Shell lines with their `\\` continuations joined, each with its first line number."""
    out, pending, start = [], "", 0
    for n, line in lines:
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def commands_in(text: str, name: str) -> list[Command]:
    """Every `python -m` command of a markdown text: in fenced blocks and in inline code."""
    found: list[Command] = []
    fence: list[tuple[int, str]] | None = None
    prose: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            if fence is None:
                fence = []
            else:
                for start, joined in _join_continuations(fence):
                    found += _shell_commands(joined, f"{name}:{start}")
                fence = None
            continue
        (prose if fence is None else fence).append((n, line))
    # Inline code may wrap onto the next line of a paragraph.
    joined = "\n".join(line for _, line in prose)
    for span in re.finditer(r"(`+)(.+?)\1", joined, flags=re.DOTALL):
        code = span.group(2)
        if "-m " not in code:
            continue
        line = prose[joined.count("\n", 0, span.start())][0]
        found += _shell_commands(code.replace("\\\n", " ").replace("\n", " "), f"{name}:{line}")
    return found


def _split_launched(cmd: Command) -> list[Command]:
    """`python -m experiments.launch ... -- MODULE ARGS` is two commands: the launcher's and the
    module's it starts."""
    if "--" not in cmd.args:
        return [cmd]
    i = cmd.args.index("--")
    inner = cmd.args[i + 1:]
    return [Command(cmd.where, cmd.module, cmd.args[:i]),
            *([Command(cmd.where, inner[0], inner[1:])] if inner else [])]


def documented_commands() -> list[Command]:
    cmds = []
    for path in DOC_FILES:
        cmds += commands_in(path.read_text(), str(path.relative_to(ROOT)))
    return [c for cmd in cmds for c in _split_launched(cmd) if c.module not in SKIPPED]


# ----------------------------------------------------------------------------- module facts

_FACTS_SCRIPT = r"""
import argparse, importlib, json, sys
from absl import flags

FLAGS = flags.FLAGS


class Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def capture(self, args=None, namespace=None):
    raise Captured(self)


argparse.ArgumentParser.parse_args = capture


def absl_facts(name):
    out = {}
    for module_flags in FLAGS.flags_by_module_dict().values():
        for flag in module_flags:
            spec = {"boolean": bool(flag.boolean)}
            if type(flag.parser).__name__ == "ConfigFileFlagParser":
                spec["config_file"] = flag.default_unparsed or ""
            enum = getattr(flag.parser, "enum_values", None)
            if enum:
                spec["enum"] = list(enum)
            out[flag.name] = spec
    # Forget this module's flags, so that the next entry point can define its own.
    for flag in list(FLAGS.flags_by_module_dict().get(name, [])):
        delattr(FLAGS, flag.name)
    return {"kind": "absl", "flags": out}


def argparse_facts(module):
    sys.argv = [module.__name__]
    try:
        module.main()
    except Captured as c:
        options = {}
        for action in c.parser._actions:
            for option in action.option_strings:
                options[option] = {"takes_value": action.nargs != 0,
                                   "choices": [str(x) for x in action.choices]
                                   if action.choices else None}
        return {"kind": "argparse", "options": options}
    return {"error": "main() returned without parsing its flags"}


facts = {}
for name in json.loads(sys.argv[1]):
    if not name.startswith(("experiments.", "benchmarks.")):
        facts[name] = {"error": "not an entry point (experiments.* or benchmarks.*)"}
        continue
    try:
        module = importlib.import_module(name)
        if name.startswith("experiments."):
            facts[name] = absl_facts(name)
        else:
            facts[name] = argparse_facts(module)
    except BaseException as e:
        facts[name] = {"error": f"{type(e).__name__}: {e}"}
print("FACTS " + json.dumps(facts))
"""


@functools.cache
def module_facts(modules: tuple[str, ...]) -> dict:
    """Per module: its absl flags or argparse options, or why it is no entry point."""
    proc = subprocess.run([sys.executable, "-c", _FACTS_SCRIPT, json.dumps(list(modules))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "FACTS " in proc.stdout, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("FACTS ", 1)[1])


def all_facts() -> dict:
    """One subprocess for every documented module and those the checker's own tests use."""
    modules = {c.module for c in documented_commands()} | set(CHECKER_PROBES)
    return module_facts(tuple(sorted(modules)))


# ----------------------------------------------------------------------------- checks


@functools.cache
def load_config(path: str, arg: str):
    """A config file's `get_config(arg)`, as ml_collections' --config flag loads it."""
    file = ROOT / path
    if not file.is_file():
        raise FileNotFoundError(f"no config file {path}")
    spec = importlib.util.spec_from_file_location(f"_docs_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _missing_field(config, field: str) -> str | None:
    """The first part of a dotted field that the config does not have, or None."""
    node = config
    for part in field.split("."):
        try:
            if part not in node:
                return part
            node = node[part]
        except TypeError:  # not a ConfigDict: nothing below it
            return part
    return None


def _absl_problems(cmd: Command, flags: dict) -> list[str]:
    problems, overrides, files = [], [], {}
    args, i = cmd.args, 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("-") or token in ("-", "--"):
            continue
        name, eq, value = token.lstrip("-").partition("=")
        if name in ABSL_HELP:
            continue
        base, dot, field = name.partition(".")
        if dot:
            if "config_file" not in flags.get(base, {}):
                problems.append(f"{cmd}: --{base} is no config flag of {cmd.module}, "
                                f"so --{name} overrides nothing")
            else:
                overrides.append((base, field))
            i += 0 if eq else 1
            continue
        spec = flags.get(name)
        if spec is None and name.startswith("no") and flags.get(name[2:], {}).get("boolean"):
            continue
        if spec is None:
            problems.append(f"{cmd}: {cmd.module} defines no flag --{name}")
            continue
        if not spec["boolean"] and not eq:
            value = args[i] if i < len(args) else ""
            i += 1
        if spec.get("enum") and value not in spec["enum"]:
            problems.append(f"{cmd}: --{name}={value} is not one of {', '.join(spec['enum'])}")
        if "config_file" in spec:
            files[name] = value
    for name, value in files.items():
        try:
            load_config(*value.partition(":")[::2])
        except Exception as e:  # a missing file, or get_config refusing the argument
            problems.append(f"{cmd}: --{name}={value} does not load: {type(e).__name__}: {e}")
    for base, field in overrides:
        file = files.get(base, flags.get(base, {}).get("config_file", ""))
        if not file:
            problems.append(f"{cmd}: --{base}.{field} without --{base}=FILE")
            continue
        try:
            config = load_config(*file.partition(":")[::2])
        except Exception:  # reported above when the command names the file
            continue
        missing = _missing_field(config, field)
        if missing is not None:
            problems.append(f"{cmd}: {file} has no field {field!r} (no {missing!r})")
    return problems


def _argparse_problems(cmd: Command, options: dict) -> list[str]:
    problems, args, i = [], cmd.args, 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("-"):
            continue
        name, eq, value = token.partition("=")
        spec = options.get(name)
        if spec is None:  # exact names only: argparse would also take a prefix
            problems.append(f"{cmd}: {cmd.module} has no option {name}")
            continue
        if spec["takes_value"] and not eq:
            value = args[i] if i < len(args) else ""
            i += 1
        if spec["choices"] and value not in spec["choices"]:
            problems.append(f"{cmd}: {name}={value} is not one of {', '.join(spec['choices'])}")
    return problems


def problems_of(cmd: Command, facts: dict) -> list[str]:
    """What is wrong with one command; empty when it names a real module and real flags."""
    fact = facts.get(cmd.module)
    if fact is None:
        return [f"{cmd}: {cmd.module} was not inspected"]
    if "error" in fact:
        return [f"{cmd}: {cmd.module}: {fact['error']}"]
    if fact["kind"] == "absl":
        return _absl_problems(cmd, fact["flags"])
    return _argparse_problems(cmd, fact["options"])


# ----------------------------------------------------------------------------- tests


def test_every_documented_command_names_real_modules_flags_and_config_fields():
    commands = documented_commands()
    facts = all_facts()
    problems = [p for cmd in commands for p in problems_of(cmd, facts)]
    assert not problems, "\n".join(problems)
    modules = {c.module for c in commands}
    assert {"experiments.main", "experiments.train", "benchmarks.step"} <= modules


def test_readme_test_command_is_the_ci_command():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if "pytest" in line and not line.startswith("#")]
    assert len(ci) == 1
    assert ci[0].strip() in (ROOT / "README.md").read_text()


def test_extraction_finds_fenced_continued_and_inline_commands():
    text = "\n".join([
        "Run `python -m experiments.train --config=configs/base.py",
        "--workdir=runs/a` first.",
        "```bash",
        "python3 -m venv .venv && . .venv/bin/activate && python -m pytest -n 2",
        "JAX_PLATFORMS=cpu python -m benchmarks.step --models=mlp \\",
        "    --rounds=2   # a comment",
        "```",
        "Usage: `python -m benchmarks.scale_out [--rounds=3]`.",
    ])
    got = [(c.where, c.module, c.args) for c in commands_in(text, "x.md")]
    assert got == [
        ("x.md:4", "venv", (".venv",)),
        ("x.md:4", "pytest", ("-n", "2")),
        ("x.md:5", "benchmarks.step", ("--models=mlp", "--rounds=2")),
        ("x.md:1", "experiments.train", ("--config=configs/base.py", "--workdir=runs/a")),
        ("x.md:8", "benchmarks.scale_out", ("--rounds=3",)),
    ]


@pytest.mark.parametrize("command, needle", [
    ("python -m experiments.no_such_entry_point --workdir=x", "ModuleNotFoundError"),
    ("python -m dlassign.errors", "not an entry point"),
    ("python -m experiments.train --config=configs/base.py --workdir=x --no_such_flag=1",
     "defines no flag --no_such_flag"),
    ("python -m experiments.train --config=configs/base.py --workdir=x "
     "--config.optimizer.no_such_field=0.1", "has no field 'optimizer.no_such_field'"),
    ("python -m experiments.train --config=configs/no_such_config.py --workdir=x",
     "does not load"),
    ("python -m experiments.main --workdir=x --config.tune_mlp.data.no_such=1",
     "configs/main.py has no field"),
    ("python -m experiments.train --workdir=x --config_typo.seed=1", "is no config flag"),
    ("python -m benchmarks.step --models=mlp --no_such_option=3", "no option"),
    ("python -m benchmarks.step --model=mlp", "no option --model"),
])
def test_checker_reports_bogus_commands(command, needle):
    (cmd,) = commands_in(f"```\n{command}\n```", "bogus.md")
    problems = problems_of(cmd, all_facts())
    assert len(problems) == 1 and needle in problems[0], problems


@pytest.mark.parametrize("command", [
    "python -m experiments.main --workdir=x --config.tune_mlp.data.name=mnist",
    "python -m experiments.train --config=configs/base.py --workdir x --nodistributed "
    "--config.mesh.shard_params=true --helpfull",
    "python -m benchmarks.step --models=mlp --steps_per_call 4 --json=out.json --help",
])
def test_checker_accepts_good_commands(command):
    (cmd,) = commands_in(f"```\n{command}\n```", "good.md")
    assert problems_of(cmd, all_facts()) == []


def test_a_launched_command_is_checked_as_the_launcher_and_the_module():
    cmd = Command("x.md:1", "experiments.launch",
                  ("--processes=2", "--", "experiments.train", "--config=configs/base.py"))
    assert _split_launched(cmd) == [
        Command("x.md:1", "experiments.launch", ("--processes=2",)),
        Command("x.md:1", "experiments.train", ("--config=configs/base.py",))]


# ----------------------------------------------------------------------------- runnable examples

# Pages whose ```python blocks are one program, run here in order: an example a reader copies
# must run. Other pages' Python blocks are fragments (README's architecture declaration).
RUNNABLE_PAGES = ("docs/curvature.md",)


def python_blocks(text: str) -> str:
    """The ```python fenced blocks of a markdown text, joined in order."""
    return "\n".join(m.group(1) for m in re.finditer(r"^```python\n(.*?)^```", text,
                                                      flags=re.DOTALL | re.MULTILINE))


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_the_python_examples_of_the_docs_run(page):
    """The page's example, in a fresh process (it enables float64 for itself), on the CPU."""
    code = python_blocks((ROOT / page).read_text())
    assert code.count("\n") > 10, f"{page} has no runnable example"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"{page}'s example failed:\n{out.stderr[-3000:]}"
