"""Read the fenced code blocks of a Markdown file, with the `doctest` directives before them.

The convention (also in docs/contributing.md): a block of `python` or `bash` runs as it is
written, in order, in a sandbox directory shared by the blocks of one file. An HTML comment
(invisible when rendered) right before a block changes that, one directive a line:

    <!-- doctest: skip (needs a CUDA GPU) -->       not run; still checked (see below)
    <!-- doctest: replace "--max-steps 20000" "--max-steps 4" -->
                                                     run with the text substituted (tiny sizes)
    <!-- doctest: file configs/small.yaml -->        a yaml/json/text block: written to that
                                                     path of the sandbox for later blocks
    <!-- doctest: output -->                         the next unlabelled block is this block's
                                                     exact stdout (`...` alone on a line
                                                     matches any lines)
    <!-- doctest: setup
    python or bash lines run before the block, hidden from the reader -->

Every block, skipped or not, is also checked statically: Python must compile and each name
it imports from `subllm` must exist; every `subllm ...` command (also after `python -m` or
`torchrun ... -m`) must parse with the CLI's own parser, and every `make TARGET` must name a
target of the Makefile. So a renamed module or a stale flag fails even in a block too slow
to run.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
from pathlib import Path

FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
RUNNABLE = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str  # "python", "bash", "yaml", "" ...
    code: str
    skip: str | None = None
    replace: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    file: str | None = None
    setup: str = ""
    output: str | None = None  # the expected stdout, from the next unlabelled block

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    def runnable_code(self) -> str:
        code = self.code
        for old, new in self.replace:
            if old not in code:
                raise AssertionError(f"{self.where}: `replace` text {old!r} is not in the block")
            code = code.replace(old, new)
        return code


def _directives(text: str, block: Block) -> None:
    lines = text.strip("\n").splitlines()
    for i, line in enumerate(lines):
        word, _, rest = line.strip().partition(" ")
        if word == "skip":
            block.skip = rest.strip() or "no reason given"
        elif word == "replace":
            pair = shlex.split(rest)
            if len(pair) != 2:
                raise AssertionError(f"{block.where}: `replace` takes two quoted strings: {line}")
            block.replace.append((pair[0], pair[1]))
        elif word == "file":
            block.file = rest.strip()
        elif word == "output":
            block.output = ""  # filled in from the next unlabelled block
        elif word == "setup":
            block.setup = "\n".join([rest, *lines[i + 1:]]).strip("\n")
            break
        elif word:
            raise AssertionError(f"{block.path.name}: unknown doctest directive {line!r}")


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of `path` in order; an `output` block is attached to the block
    that asked for it instead of being returned."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    pending: str | None = None
    awaiting_output: Block | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("<!-- doctest:"):
            text = line.split("<!-- doctest:", 1)[1]
            while "-->" not in text:
                i += 1
                text += "\n" + lines[i]
            pending = text.split("-->", 1)[0]
            i += 1
            continue
        m = FENCE.match(line.strip()) if line.startswith("```") else None
        if m is None:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        code = "\n".join(body) + "\n"
        if awaiting_output is not None and not m.group(1):
            awaiting_output.output = code
            awaiting_output = None
            continue
        block = Block(path, start + 1, m.group(1), code)
        if pending is not None:
            _directives(pending, block)
            pending = None
        if block.output is not None:
            awaiting_output = block
        out.append(block)
    return out


# ---------------------------------------------------------------------------------------------
# Static checks


def check_python(block: Block) -> None:
    import importlib

    tree = ast.parse(block.code, filename=block.where)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "subllm":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        raise AssertionError(f"{block.where}: `from {node.module} import "
                                             f"{alias.name}`: no such name") from None
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "subllm":
                    importlib.import_module(alias.name)


def commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped,
    split at `;`, `&&`, `||`, `|`, leading VAR=value assignments removed."""
    out: list[list[str]] = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        out.append([])
        for token in lexer:
            if token in {";", "&&", "||", "|", "&"}:
                out.append([])
            else:
                out[-1].append(token)
    cleaned = []
    for cmd in out:
        while cmd and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[0]):
            cmd = cmd[1:]
        if cmd:
            cleaned.append(cmd)
    return cleaned


def subllm_argv(cmd: list[str]) -> list[str] | None:
    if cmd[0] == "subllm":
        return cmd[1:]
    for j in range(len(cmd) - 1):
        if cmd[j] == "-m" and cmd[j + 1] == "subllm":
            return cmd[j + 2:]
    return None


def check_bash(block: Block, makefile: Path) -> None:
    from subllm.cli import build_parser

    targets = set(re.findall(r"^([\w-]+):", makefile.read_text(), re.M))
    for cmd in commands(block.code):
        argv = subllm_argv(cmd)
        if argv is not None:
            if any("[" in a or "]" in a for a in argv):
                raise AssertionError(f"{block.where}: `subllm {' '.join(argv)}` has a "
                                     "[placeholder]; write runnable commands in bash blocks")
            try:
                build_parser(argv).parse_args(argv)
            except SystemExit as e:
                if e.code not in (0, None):
                    raise AssertionError(f"{block.where}: `subllm {' '.join(argv)}` does not "
                                         "parse (the CLI's message is above)") from None
        elif cmd[0] == "make":
            for target in (a for a in cmd[1:] if not a.startswith("-") and "=" not in a):
                if target not in targets:
                    raise AssertionError(f"{block.where}: `make {target}`: no such target")
