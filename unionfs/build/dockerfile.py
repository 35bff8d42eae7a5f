"""The Dockerfile parser: text -> instructions, with every syntax error found before anything runs.

What the Dockerfile reference defines (moby/buildkit ``frontend/dockerfile/docs/reference.md``):
parser directives (``# escape=``, ``# syntax=`` accepted and ignored) only before
the first comment, blank line or instruction; comments (``#`` as the first
non-blank character of a line, also between continuation lines); line
continuation with the escape character; ``--flag=value`` options; the JSON (exec)
form; heredocs (``<<EOF``, ``<<-EOF``, ``<<"EOF"``) for RUN, COPY and ADD.
Substitution is not done here (it needs the build's variables): see
:mod:`unionfs.build.words`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..errors import UsageError

INSTRUCTIONS = ("FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL")
# The options each instruction takes (anything else is a syntax error, as in BuildKit).
FLAGS = {
    "FROM": {"platform"},
    "RUN": {"network", "mount", "security"},
    "COPY": {"from", "chown", "chmod", "link", "parents", "exclude"},
    "ADD": {"chown", "chmod", "link", "keep-git-dir", "checksum", "exclude"},
    "HEALTHCHECK": {"interval", "timeout", "start-period", "start-interval", "retries"},
}
HEREDOC_INSTRUCTIONS = ("RUN", "COPY", "ADD")
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_HEREDOC = re.compile(r"<<(-?)(?:\"([^\"\s]+)\"|'([^'\s]+)'|([A-Za-z_][A-Za-z0-9_]*))")


class DockerfileError(UsageError):
    """A syntax error: ``FILE:LINE: INSTRUCTION: what`` (exit status 2, before any step runs)."""


@dataclass(frozen=True)
class Heredoc:
    name: str
    content: str
    expand: bool        # an unquoted delimiter: the shell (or COPY) expands variables in it


@dataclass(frozen=True)
class Instruction:
    cmd: str                              # upper case: RUN, COPY, ...
    rest: str                             # the text after the word and the flags, continuations joined
    line: int                             # where it starts (1-based)
    flags: tuple[tuple[str, str], ...] = ()
    heredocs: tuple[Heredoc, ...] = ()
    json: tuple[str, ...] | None = None   # the exec form, when ``rest`` is a JSON string array
    original: str = ""                    # as written (for messages and ONBUILD)

    def heredoc(self, word: str) -> Heredoc | None:
        """The heredoc a word such as ``<<EOF``, ``<<-"EOF"`` stands for, if any."""
        m = _HEREDOC.fullmatch(word.strip())
        if not m:
            return None
        name = m.group(2) or m.group(3) or m.group(4)
        return next((h for h in self.heredocs if h.name == name), None)

    def flag(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.flags:
            if k == name:
                return v
        return default


@dataclass
class Dockerfile:
    path: str
    instructions: list[Instruction] = field(default_factory=list)
    escape: str = "\\"
    directives: dict[str, str] = field(default_factory=dict)

    def error(self, ins: Instruction | int, msg: str) -> DockerfileError:
        if isinstance(ins, Instruction):
            return DockerfileError(f"{self.path}:{ins.line}: {ins.cmd}: {msg}")
        return DockerfileError(f"{self.path}:{ins}: {msg}")


def json_array(text: str) -> tuple[str, ...] | None:
    s = text.strip()
    if not s.startswith("["):
        return None
    try:
        v = json.loads(s)
    except ValueError:
        return None
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    return None


def _take_flags(rest: str) -> tuple[list[tuple[str, str]], str]:
    flags = []
    while True:
        s = rest.lstrip()
        m = re.match(r"--([a-zA-Z][a-zA-Z0-9-]*)(?:=(\S*))?(?:\s+|$)", s)
        if not m:
            return flags, s
        flags.append((m.group(1), m.group(2) if m.group(2) is not None else "true"))
        rest = s[m.end():]


def parse(text: str, path: str = "Dockerfile") -> Dockerfile:
    """Parse a whole Dockerfile; a :class:`DockerfileError` names the file and line of the first mistake."""
    df = Dockerfile(path)
    lines = text.removeprefix("\ufeff").splitlines()   # a UTF-8 BOM, as Windows editors write it
    i = 0
    # Parser directives: only at the very top, each at most once.
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if not m:
            break
        key = m.group(1).lower()
        if key not in ("escape", "syntax", "check"):
            break   # an ordinary comment: directives end here
        if key in df.directives:
            raise df.error(i + 1, f"parser directive {key!r} given twice")
        df.directives[key] = m.group(2)
        i += 1
    esc = df.directives.get("escape", "\\")
    if esc not in ("\\", "`"):
        raise df.error(1, f"invalid escape character {esc!r}: use \\ or `")
    df.escape = esc

    while i < len(lines):
        raw = lines[i]
        start = i + 1
        i += 1
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        parts = [raw]
        text_ = raw.rstrip()
        # Continuation: the escape character at the end of the line; comment and blank lines inside are dropped.
        while text_.endswith(esc):
            text_ = text_[:-1]
            parts[-1] = text_
            while i < len(lines) and (lines[i].lstrip().startswith("#") or not lines[i].strip()):
                i += 1
            if i >= len(lines):
                break
            parts.append(lines[i])
            text_ = lines[i].rstrip()
            i += 1
        logical = "".join(parts).strip()
        word, _, rest = logical.partition(" ")
        if "\t" in word:
            word, _, more = word.partition("\t")
            rest = more + " " + rest
        cmd = word.upper()
        if cmd not in INSTRUCTIONS:
            raise df.error(start, f"unknown instruction: {word}")
        flags: list[tuple[str, str]] = []
        if cmd in FLAGS:
            flags, rest = _take_flags(rest)
            for k, _v in flags:
                if k not in FLAGS[cmd]:
                    raise df.error(start, f"{cmd}: unknown flag: --{k}")
        rest = rest.strip()
        heredocs: list[Heredoc] = []
        if cmd in HEREDOC_INSTRUCTIONS and json_array(rest) is None:
            for m in _HEREDOC.finditer(rest):
                strip_tabs = m.group(1) == "-"
                name = m.group(2) or m.group(3) or m.group(4)
                body = []
                while True:
                    if i >= len(lines):
                        raise df.error(start, f"{cmd}: unterminated heredoc <<{name} (no line {name!r} before the end)")
                    line = lines[i]
                    i += 1
                    if strip_tabs:
                        line = line.lstrip("\t")
                    if line == name:
                        break
                    body.append(line + "\n")
                heredocs.append(Heredoc(name, "".join(body), m.group(4) is not None))
        if not rest:
            raise df.error(start, f"{cmd} needs an argument")
        df.instructions.append(Instruction(cmd, rest, start, tuple(flags), tuple(heredocs), json_array(rest),
                                           logical))
    if not df.instructions:
        raise df.error(1, "the Dockerfile has no instructions")
    first = next((ins for ins in df.instructions if ins.cmd != "ARG"), None)
    if first is None:
        raise df.error(df.instructions[-1], "no FROM: a Dockerfile needs a FROM after its ARGs")
    if first.cmd != "FROM":
        raise df.error(first, "the first instruction (after ARGs) must be FROM")
    for ins in df.instructions:
        _check(df, ins)
    return df


SUBSTITUTED = ("ADD", "COPY", "ENV", "EXPOSE", "FROM", "LABEL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR", "ARG")


def _check(df: Dockerfile, ins: Instruction) -> None:
    """The argument checks that need no variables, so a mistake stops the build before it starts."""
    from .words import RequiredVariable, SubstitutionError, words
    if ins.cmd in SUBSTITUTED:
        try:
            words(ins.rest, {}, df.escape)
        except RequiredVariable:
            pass
        except SubstitutionError as e:
            raise df.error(ins, str(e)) from None
    if ins.cmd in ("COPY", "ADD"):
        for name in ("parents", "exclude"):
            if ins.flag(name) is not None:
                raise df.error(ins, f"--{name} is not supported")
    if ins.cmd == "SHELL" and not ins.json:
        raise df.error(ins, 'needs the JSON form, e.g. SHELL ["/bin/sh", "-c"]')
    if ins.cmd in ("COPY", "ADD") and not ins.heredocs:
        n = len(ins.json) if ins.json is not None else len(ins.rest.split())
        if n < 2:
            raise df.error(ins, "needs a source and a destination")
    if ins.cmd == "ONBUILD":
        word = ins.rest.split()[0].upper()
        if word in ("ONBUILD", "FROM", "MAINTAINER"):
            raise df.error(ins, f"{word} is not allowed as an ONBUILD trigger")
        if word not in INSTRUCTIONS:
            raise df.error(ins, f"unknown instruction: {ins.rest.split()[0]}")
    if ins.cmd == "HEALTHCHECK":
        word = ins.rest.split()[0].upper()
        if word not in ("CMD", "NONE"):
            raise df.error(ins, "takes CMD ... or NONE")
    if ins.cmd == "FROM":
        words = ins.rest.split()
        if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
            raise df.error(ins, "takes IMAGE [AS NAME]")


def parse_trigger(text: str, path: str, line: int) -> Instruction:
    """One ONBUILD trigger as an instruction of its own (run in the child's first step)."""
    df = parse("FROM scratch\n" + text + "\n", path)
    ins = df.instructions[1]
    return Instruction(ins.cmd, ins.rest, line, ins.flags, ins.heredocs, ins.json, ins.original)
