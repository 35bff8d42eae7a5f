"""The Dockerfile parser, substitution, .dockerignore matching and ADD's archive rules, in plain Python.

The expectations are the Dockerfile reference's own examples (moby/buildkit docs/reference.md: "Environment
replacement", "Parser directives", "Here-Documents") and moby/patternmatcher's rules; the full builds in
test_build.py check the same features against podman build."""
from __future__ import annotations

import io
import tarfile

import pytest

from unionfs.build.context import ignored, parse_ignore
from unionfs.build.copying import CopyError, Plan, extract_archive
from unionfs.build.dockerfile import DockerfileError, parse
from unionfs.build.words import SubstitutionError, pairs, word, words


def test_directives_comments_continuations():
    df = parse("# syntax=docker/dockerfile:1\n# escape=`\n\nFROM scratch\n# a comment\nRUN dir c:\\ `\n"
               "  # a comment inside\n\n  && echo done\nCOPY a b\n", "Df")
    assert df.escape == "`" and df.directives == {"syntax": "docker/dockerfile:1", "escape": "`"}
    run = df.instructions[1]
    assert (run.cmd, run.line, run.rest) == ("RUN", 6, "dir c:\\   && echo done")
    assert parse("\ufeffFROM scratch\r\nCMD [\"a\"]\r\n").instructions[1].json == ("a",)   # BOM, CRLF
    # After the first instruction a directive is only a comment.
    df = parse("FROM scratch\n# escape=`\nRUN echo a \\\n b\n")
    assert df.escape == "\\" and df.instructions[1].rest == "echo a  b"


def test_json_and_shell_forms_flags_heredocs():
    df = parse('FROM --platform=linux/amd64 scratch AS s\nCMD ["a", "b c"]\nENTRYPOINT echo hi\n'
               "COPY --chown=1:2 --chmod=0644 x y\nRUN <<EOF\nline $x\nEOF\n"
               "COPY <<-'A' <<B /dir/\n\tliteral $y\nA\nexpanded $y\nB\nRUN ['not', json]\n")
    frm, cmd, ent, cp, run, cp2, bad = df.instructions
    assert frm.flag("platform") == "linux/amd64" and frm.rest == "scratch AS s"
    assert cmd.json == ("a", "b c") and ent.json is None
    assert cp.flags == (("chown", "1:2"), ("chmod", "0644")) and cp.rest == "x y"
    assert run.heredocs[0].content == "line $x\n" and run.heredocs[0].expand
    assert [(h.name, h.content, h.expand) for h in cp2.heredocs] == [("A", "literal $y\n", False),
                                                                     ("B", "expanded $y\n", True)]
    assert bad.json is None


@pytest.mark.parametrize("text,msg", [
    ("FROM scratch\nRUNN x\n", "Df:2: unknown instruction: RUNN"),
    ("FROM scratch\nRUN <<EOF\nno end\n", "Df:2: RUN: unterminated heredoc <<EOF"),
    ("FROM scratch\nCOPY --bogus=1 a b\n", "Df:2: COPY: unknown flag: --bogus"),
    ("FROM scratch\nCOPY a\n", "Df:2: COPY: needs a source and a destination"),
    ("FROM scratch\nONBUILD FROM x\n", "Df:2: ONBUILD: FROM is not allowed as an ONBUILD trigger"),
    ("FROM a b c d\n", "Df:1: FROM: takes IMAGE [AS NAME]"),
    ("ENV a=1\nFROM scratch\n", "Df:1: ENV: the first instruction (after ARGs) must be FROM"),
    ("FROM scratch\nHEALTHCHECK echo\n", "Df:2: HEALTHCHECK: takes CMD ... or NONE"),
    ("# escape=x\nFROM scratch\n", "Df:1: invalid escape character"),
    ("\n\n", "Df:1: the Dockerfile has no instructions"),
    ("FROM scratch\nENV a=\"b\n", "Df:2: ENV: unterminated \" quote"),              # found before anything runs
    ("FROM scratch\nWORKDIR ${a\n", "Df:2: WORKDIR: missing '}' in substitution"),
    ("FROM scratch\nCOPY --exclude=*.c a b\n", "Df:2: COPY: --exclude is not supported"),
])
def test_syntax_errors_name_file_line_and_instruction(text, msg):
    with pytest.raises(DockerfileError) as e:
        parse(text, "Df")
    assert str(e.value).startswith(msg), str(e.value)


ENV = {"v": "val", "empty": "", "p": "/opt"}


@pytest.mark.parametrize("text,want", [
    ("$v", "val"), ("${v}", "val"), ("a${v}b", "avalb"), ("$v/x", "val/x"),
    ("${v:-w}", "val"), ("${empty:-w}", "w"), ("${unset:-w}", "w"),
    ("${v-w}", "val"), ("${empty-w}", ""), ("${unset-w}", "w"),
    ("${v:+w}", "w"), ("${empty:+w}", ""), ("${unset:+w}", ""),
    ("${v+w}", "w"), ("${empty+w}", "w"), ("${unset+w}", ""),
    ("\\$v", "$v"), ("\\${v}", "${v}"), ("'$v'", "$v"), ('"$v x"', "val x"), ('"\\$v"', "$v"),
    ("${unset:-${p}/d}", "/opt/d"), ("$", "$"), ("a$", "a$"), ("$1x", "x"),
])
def test_substitution(text, want):
    assert word(text, ENV) == want


def test_words_pairs_and_one_value_per_instruction():
    assert words('a "b c" $p/x \'$v\'', ENV) == ["a", "b c", "/opt/x", "$v"]
    assert pairs("a=bye b=$a c=\"x y\" d=${v}", {"a": "hi", "v": "1"}) == [("a", "bye"), ("b", "hi"), ("c", "x y"),
                                                                        ("d", "1")]
    assert pairs("key a value $v", ENV) == [("key", "a value val")]          # the legacy ENV form
    assert pairs("A B=1", {}, what="ARG") == [("A", None), ("B", "1")]
    with pytest.raises(SubstitutionError):
        word("${v", ENV)
    with pytest.raises(SubstitutionError):
        word("${unset:?is required}", ENV)


@pytest.mark.parametrize("patterns,path,out", [
    ("*.log", "a.log", True), ("*.log", "d/a.log", False), ("**/*.log", "d/e/a.log", True),
    ("d", "d/e/f", True), ("/d/", "d/x", True), ("./d/../e", "e", True),
    ("*.log\n!keep.log", "keep.log", False), ("!keep.log\n*.log", "keep.log", True),   # the last match wins
    ("# *.log\n", "a.log", False), (" # x", "# x", True),                               # a comment only in column 1
    ("a?c", "abc", True), ("a?c", "a/c", False), ("[a-c]x", "bx", True), ("[^a]x", "ax", False),
    ("**", "any/thing", True), ("d/**/f", "d/f", True), ("d/**/f", "d/a/b/f", True), ("d/**", "e/f", False),
])
def test_dockerignore(patterns, path, out):
    assert ignored(parse_ignore(patterns), path) is out


def _archive(members) -> "tarfile.TarFile":
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return tarfile.open(fileobj=buf, mode="r:*")


def _member(name: str, kind=tarfile.REGTYPE, link: str = "", data: bytes | None = None) -> tuple:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.size = kind, link, len(data or b"")
    return ti, data


@pytest.mark.parametrize("members,msg", [
    ([_member("../up", data=b"x")], "leaves its directory"),
    ([_member("a", data=b"x"), _member("b", tarfile.LNKTYPE, "../../etc/passwd")], "not to an earlier file"),
    ([_member("b", tarfile.LNKTYPE, "a"), _member("a", data=b"x")], "not to an earlier file"),
])
def test_add_refuses_archives_that_leave_the_destination(members, msg):
    with pytest.raises(CopyError) as e:
        extract_archive(_archive(members), "dest", Plan(), None, "ADD")
    assert msg in str(e.value)


def test_add_keeps_hard_links_inside_the_archive():
    p = Plan()
    extract_archive(_archive([_member("./a", data=b"x"), _member("c", tarfile.LNKTYPE, "./a")]), "dest", p, None, "ADD")
    assert [(m.path, m.link, m.hardlink) for m in p.members] == [("dest/a", "", False), ("dest/c", "dest/a", True)]
