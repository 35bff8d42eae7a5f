"""Dockerfile words: variable substitution and quotes, as BuildKit's shell lexer does them.

``$v ${v} ${v:-w} ${v-w} ${v:+w} ${v+w} ${v:?msg} ${v?msg}``; the escape character
makes the next character literal (``\\$v`` is ``$v``); single quotes are literal,
double quotes expand variables.  :func:`word` gives one value (quotes removed),
:func:`words` splits on unquoted blanks.  Used for ADD COPY ENV EXPOSE FROM LABEL
STOPSIGNAL USER VOLUME WORKDIR ONBUILD; RUN/CMD/ENTRYPOINT are left to the shell.
"""
from __future__ import annotations

from typing import Mapping

from ..errors import UsageError

_NAME_FIRST = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME = _NAME_FIRST | set("0123456789")


class SubstitutionError(UsageError):
    """A malformed word (an unterminated quote, a bad ``${...}``): a syntax error."""


class RequiredVariable(SubstitutionError):
    """``${v:?msg}`` of an unset variable: known only once the build's variables are."""


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str) -> None:
        self.s, self.i, self.env, self.esc = text, 0, env, escape

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def next(self) -> str:
        ch = self.peek()
        self.i += 1
        return ch

    def run(self, split: bool, stop: str = "") -> list[str]:
        out: list[str] = []
        cur: list[str] = []
        started = False
        while self.i < len(self.s):
            ch = self.peek()
            if stop and ch == stop:
                break
            self.i += 1
            if split and ch in " \t\n" :
                if started:
                    out.append("".join(cur))
                    cur, started = [], False
                continue
            started = True
            if ch == self.esc:
                nxt = self.next()
                cur.append(nxt)       # the escape makes the next character literal (a trailing one is dropped)
            elif ch == "'":
                cur.append(self._until("'"))
            elif ch == '"':
                cur.append(self._double())
            elif ch == "$":
                cur.append(self._dollar())
            else:
                cur.append(ch)
        if started or not split:
            out.append("".join(cur))
        return out

    def _until(self, quote: str) -> str:
        j = self.s.find(quote, self.i)
        if j < 0:
            raise SubstitutionError(f"unterminated {quote} quote in {self.s!r}")
        text, self.i = self.s[self.i:j], j + 1
        return text

    def _double(self) -> str:
        cur = []
        while True:
            if self.i >= len(self.s):
                raise SubstitutionError(f'unterminated " quote in {self.s!r}')
            ch = self.next()
            if ch == '"':
                return "".join(cur)
            if ch == self.esc and self.peek() in ('"', "$", self.esc):
                cur.append(self.next())
            elif ch == "$":
                cur.append(self._dollar())
            else:
                cur.append(ch)

    def _name(self) -> str:
        start = self.i
        while self.peek() and self.peek() in _NAME:
            self.i += 1
        return self.s[start:self.i]

    def _dollar(self) -> str:
        ch = self.peek()
        if ch == "{":
            self.i += 1
            name = self._name()
            if not name:
                raise SubstitutionError(f"bad substitution in {self.s!r}")
            op = self.next()
            if not op:
                raise SubstitutionError(f"missing '}}' in substitution {self.s!r}")
            if op == "}":
                return self.env.get(name, "")
            if op == ":":
                op += self.next()
            if op not in (":-", "-", ":+", "+", ":?", "?"):
                raise SubstitutionError(f"unsupported modifier ({op}) in substitution {self.s!r}")
            sub = _Lexer(self.s, self.env, self.esc)
            sub.i = self.i
            word = sub.run(False, stop="}")[0]
            if sub.peek() != "}":
                raise SubstitutionError(f"missing '}}' in substitution {self.s!r}")
            self.i = sub.i + 1
            val = self.env.get(name)
            set_, nonempty = val is not None, bool(val)
            if op == ":-":
                return val if nonempty else word
            if op == "-":
                return val if set_ else word
            if op == ":+":
                return word if nonempty else ""
            if op == "+":
                return word if set_ else ""
            if (op == ":?" and not nonempty) or (op == "?" and not set_):
                raise RequiredVariable(f"{name}: {word or 'is not set'}")
            return val or ""
        if ch and ch in _NAME_FIRST:
            return self.env.get(self._name(), "")
        if ch and ch.isdigit():
            self.i += 1
            return ""
        return "$"


def word(text: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """One value, substituted and unquoted."""
    return _Lexer(text, env, escape).run(False)[0]


def words(text: str, env: Mapping[str, str], escape: str = "\\") -> list[str]:
    """Blank-separated values, each substituted and unquoted."""
    return _Lexer(text, env, escape).run(True)


def split_keeping_quotes(text: str, escape: str = "\\") -> list[str]:
    """Blank-separated words with their quotes and escapes kept (for ``k=v`` pairs substituted later)."""
    out, cur, quote, i = [], [], "", 0
    while i < len(text):
        ch = text[i]
        if ch == escape and i + 1 < len(text) and quote != "'":
            cur.append(ch + text[i + 1])
            i += 2
            continue
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in " \t\n":
            if cur:
                out.append("".join(cur))
                cur = []
            i += 1
            continue
        cur.append(ch)
        i += 1
    if quote:
        raise SubstitutionError(f"unterminated {quote} quote in {text!r}")
    if cur:
        out.append("".join(cur))
    return out


def pairs(text: str, env: Mapping[str, str], escape: str = "\\", what: str = "ENV") -> list[tuple[str, str]]:
    """``k=v k2="v 2"`` (or the legacy ``k v w``) for ENV, LABEL and ARG: every value sees ``env`` as it was
    before the instruction (``ENV a=1 b=$a`` gives b the old a)."""
    ws = split_keeping_quotes(text, escape)
    if not ws:
        raise SubstitutionError(f"{what} needs KEY=VALUE")
    if "=" not in ws[0] and what != "ARG":
        key, _, value = text.strip().partition(" ")
        if not value.strip() and what == "ENV":
            raise SubstitutionError(f"ENV {key}: needs a value (ENV KEY=VALUE or ENV KEY VALUE)")
        return [(word(key, env, escape), word(value.strip(), env, escape))]
    out = []
    for w in ws:
        k, eq, v = w.partition("=")
        if not eq:
            if what == "ARG":
                out.append((word(k, env, escape), None))
                continue
            raise SubstitutionError(f"{what}: {w!r} is not KEY=VALUE")
        out.append((word(k, env, escape), word(v, env, escape)))
    return out
