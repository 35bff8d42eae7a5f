"""``unionfs build``: a Dockerfile's stages and instructions, run on our own union mounts, committed step by step.

Each instruction makes an image of the store, as Docker's classic builder does:
metadata instructions (ENV, CMD, LABEL, ...) a new config with an ``empty_layer``
history entry; COPY, ADD and a WORKDIR that must be created a layer written as a
tar (:mod:`unionfs.build.layer`); RUN a container of the image so far, mounted
writable by a unionfs daemon (no copy of the rootfs) and run by crun, whose
committed changes (read from its upper dir alone) are the layer.  A RUN that
changes nothing adds no layer.  Every step's image is registered (untagged) before
the next starts, so a build killed at any moment leaves whole images and the
cache entries that point to them; the tags are written last.

The cache (:mod:`unionfs.build.cache`) maps (parent image, instruction after
substitution, for COPY/ADD the sources' content, for RUN the build args in scope)
to the step's image.  ``SOURCE_DATE_EPOCH`` sets every ``created`` time and caps
every mtime in new layers, so the same inputs give the same image id.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import re
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO, TypeVar

from ..container.mounting import image_lower
from ..container.commit import container_layer
from ..errors import UsageError
from ..image.load import add_layer_tar, register_config
from ..image.mutate import new_config
from ..image.model import ImageError, Layer, Reference
from ..image.store import Store
from . import cache, copying, runstep, words
from .context import Context, ContextError, hash_entries
from .dockerfile import Dockerfile, Instruction, json_array, parse, parse_trigger
from .layer import ImageTree, Member, write_tar

PROXY_ARGS = {n for k in ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY") for n in (k, k.lower())}
PREDEFINED = PROXY_ARGS | {"SOURCE_DATE_EPOCH"}   # build args that need no ARG (and draw no "not consumed" warning)
PLATFORM = ("linux", "amd64")
T = TypeVar("T")
# The history of a step without a command, whatever the SHELL (as docker and buildah write it).
NOP = "/bin/sh -c #(nop)"


class BuildError(UsageError):
    """A step failed: one line naming the Dockerfile line; ``status`` is the exit status to give."""

    def __init__(self, msg: str, status: int = 2) -> None:
        super().__init__(msg)
        self.status = status


@dataclass
class Options:
    tags: list[str] = field(default_factory=list)
    dockerfile: str | None = None              # a path, "-" for stdin; default CONTEXT/Dockerfile
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    platform: str | None = None
    quiet: bool = False
    source_date_epoch: int | None = None
    runtime: str | None = None


def key_values(values: list[str] | None, what: str) -> dict[str, str]:
    """``--build-arg``/``--label`` values: ``KEY=VALUE``, or ``KEY`` alone for our environment's value."""
    out = {}
    for kv in values or []:
        k, eq, v = kv.partition("=")
        if not k:
            raise UsageError(f"{what} {kv!r}: give KEY=VALUE")
        out[k] = v if eq else os.environ.get(k, "")
    return out


@dataclass
class Stage:
    index: int
    name: str | None
    from_ins: Instruction
    body: list[Instruction]


@dataclass
class State:
    """A stage while it is built: the image so far and what only the build knows (ARGs, the shell)."""
    image_id: str | None
    config: dict
    layers: list[Layer]
    args: dict[str, str] = field(default_factory=dict)
    shell: list[str] = field(default_factory=lambda: ["/bin/sh", "-c"])
    cmd_set: bool = False

    @property
    def inner(self) -> dict:
        return self.config.setdefault("config", {})

    def env(self) -> dict[str, str]:
        out = {}
        for e in self.inner.get("Env") or []:
            k, _, v = e.partition("=")
            out[k] = v
        return out

    def vars(self) -> dict[str, str]:
        """What substitution sees: the build args in scope, overridden by ENV (as in Docker)."""
        return {**self.args, **self.env()}


def _lexed(df: Dockerfile, ins: Instruction, call: Callable[[], T]) -> T:
    """A :mod:`.words` reading of an instruction's text; a mistake is the Dockerfile's, with its line."""
    try:
        return call()
    except UsageError as e:
        raise df.error(ins, str(e)) from None


def _pairs(df: Dockerfile, ins: Instruction, env: dict) -> list[tuple[str, str]]:
    """The ``k=v`` pairs of an ARG, ENV or LABEL."""
    return _lexed(df, ins, lambda: words.pairs(ins.rest, env, df.escape, ins.cmd))


def _iso(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def scratch_config(platform: tuple[str, str]) -> dict:
    return {"architecture": platform[1], "os": platform[0], "config": {},
            "rootfs": {"type": "layers", "diff_ids": []}, "history": []}


def _duration(text: str, what: str) -> int:
    """A Go duration (``30s``, ``1m30s``, ``500ms``) in nanoseconds."""
    units = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise UsageError(f"{what}: {text!r} is not a duration (e.g. 30s, 1m30s)")
    return int(sum(float(a) * units[b] for a, b in parts))


class Builder:
    """One build: the Dockerfile's stages the target needs, step by step, each step an image of the store."""

    def __init__(self, store: Store, context_dir: str, opts: Options, out: TextIO = sys.stdout) -> None:
        self.store, self.context_dir, self.opts, self.out = store, context_dir, opts, out
        self.now = opts.source_date_epoch
        self.platform = PLATFORM
        if opts.platform:
            os_, _, arch = opts.platform.partition("/")
            if (os_, arch.partition("/")[0]) != PLATFORM:
                raise UsageError(f"--platform {opts.platform}: only linux/amd64 (this host) can be built")
        self.used_args: set[str] = set()
        self.stage_images: dict[str, str] = {}    # stage name or index -> image id
        self.step_no = 0
        self.steps_total = 0
        self.runtime_path: str | None = None

    # --- output ------------------------------------------------------------------

    def say(self, text: str) -> None:
        if not self.opts.quiet:
            print(text, file=self.out, flush=True)

    # --- the Dockerfile -------------------------------------------------------------

    def read_dockerfile(self) -> Dockerfile:
        path = self.opts.dockerfile
        if path == "-":
            return parse(sys.stdin.read(), "Dockerfile")
        if path is None:   # podman's Containerfile when there is no Dockerfile
            path = os.path.join(self.context_dir, "Dockerfile")
            alt = os.path.join(self.context_dir, "Containerfile")
            if not os.path.lexists(path) and os.path.lexists(alt):
                path = alt
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"{path}: {e.strerror}") from None
        return parse(text, path)

    def stages(self, df: Dockerfile) -> tuple[dict[str, str], list[Stage]]:
        os_, arch = self.platform
        # BuildKit's automatic platform ARGs: in the global scope, and in a stage once declared by ``ARG NAME``.
        meta: dict[str, str] = {"BUILDPLATFORM": f"{os_}/{arch}", "BUILDOS": os_, "BUILDARCH": arch,
                                "BUILDVARIANT": "", "TARGETPLATFORM": f"{os_}/{arch}", "TARGETOS": os_,
                                "TARGETARCH": arch, "TARGETVARIANT": ""}
        stages: list[Stage] = []
        for ins in df.instructions:
            if ins.cmd == "FROM":
                words_ = ins.rest.split()
                name = words_[2].lower() if len(words_) == 3 else None
                if name and any(s.name == name for s in stages):
                    raise df.error(ins, f"duplicate stage name {name!r}")
                stages.append(Stage(len(stages), name, ins, []))
            elif not stages:   # ARG before the first FROM: for FROM lines only
                for k, v in _pairs(df, ins, meta):
                    meta[k] = self.opts.build_args.get(k, v if v is not None else "")
                    if k in self.opts.build_args:
                        self.used_args.add(k)
            else:
                stages[-1].body.append(ins)
        return meta, stages

    def needed(self, df: Dockerfile, meta: dict[str, str], stages: list[Stage]) -> list[Stage]:
        """The stages the target needs (by FROM and COPY --from), in Dockerfile order."""
        target = stages[-1]
        if self.opts.target:
            found = [s for s in stages if s.name == self.opts.target.lower()]
            if not found:
                raise UsageError(f"{df.path}: --target {self.opts.target}: no stage of that name "
                                 f"(stages: {', '.join(s.name or str(s.index) for s in stages)})")
            target = found[0]
        want = {target.index}
        todo = [target]
        while todo:
            s = todo.pop()
            refs = [self._word(df, s.from_ins, s.from_ins.rest.split()[0], meta)]
            refs += [ins.flag("from") for ins in s.body if ins.cmd == "COPY" and ins.flag("from")]
            for ref in refs:
                dep = self._stage_ref(stages[:s.index + 1], ref, s)
                if dep is not None and dep.index not in want:
                    want.add(dep.index)
                    todo.append(dep)
        return [s for s in stages if s.index in want]

    def check_bases(self, df: Dockerfile, meta: dict[str, str], todo: list[Stage], stages: list[Stage]) -> None:
        """Every base image the build needs is in the store: else the first missing one stops it before it starts."""
        for s in todo:
            base = self._word(df, s.from_ins, s.from_ins.rest.split()[0], meta)
            if base.lower() == "scratch" or self._stage_ref(stages[:s.index + 1], base, s) is not None:
                continue
            try:
                self.store.resolve(base)
            except ImageError:
                raise df.error(s.from_ins, f"{base}: no such image in the store (unionfs pull or load it "
                                           "first)") from None

    @staticmethod
    def _stage_ref(stages: list[Stage], ref: str, current: Stage) -> Stage | None:
        for s in stages:
            if s.index == current.index and ref.lower() == (s.name or ""):
                return None
            if s.index < current.index and (ref.lower() == s.name or ref == str(s.index)):
                return s
        return None

    def _word(self, df: Dockerfile, ins: Instruction, text: str, env: dict[str, str]) -> str:
        return _lexed(df, ins, lambda: words.word(text, env, df.escape))

    def _words(self, df: Dockerfile, ins: Instruction, text: str, env: dict[str, str]) -> list[str]:
        return _lexed(df, ins, lambda: words.words(text, env, df.escape))

    # --- the build ----------------------------------------------------------------

    def build(self) -> str:
        runstep.become_subreaper()
        refs = [Reference.parse(t) for t in self.opts.tags]   # a bad tag is refused before anything runs
        df = self.read_dockerfile()
        meta, stages = self.stages(df)
        todo = self.needed(df, meta, stages)
        self.check_bases(df, meta, todo, stages)
        self.steps_total = sum(1 + len(s.body) for s in todo)
        runstep.sweep(self.store, self.opts.runtime)
        with Context(self.context_dir) as ctx:
            self.ctx = ctx
            image_id = ""
            for s in todo:
                image_id = self.build_stage(df, meta, s, len(todo) > 1, stages)
                self.stage_images[str(s.index)] = image_id
                if s.name:
                    self.stage_images[s.name] = image_id
        unused = sorted(set(self.opts.build_args) - self.used_args - PREDEFINED)
        if unused:
            print(f"unionfs: warning: build-args not consumed: {', '.join(unused)}", file=sys.stderr)
        if self.opts.labels:
            state = self._load(image_id)
            def add_labels(c: dict) -> None:
                c["Labels"] = {**(c.get("Labels") or {}), **self.opts.labels}
            state = self.commit_step(state, ("LABEL", json.dumps(sorted(self.opts.labels.items()))),
                                     NOP + " LABEL " +
                                     " ".join(f"{k}={v}" for k, v in sorted(self.opts.labels.items())), add_labels)
            image_id = state.image_id
        if not image_id:
            raise UsageError(f"{df.path}: the target stage makes no image (FROM scratch and nothing else)")
        with self.store.locked():
            tags = self.store.tags()
            for r in refs:
                tags[str(r)] = image_id
            self.store.set_tags(tags)
        self.say(f"COMMIT {' '.join(str(r) for r in refs)}".rstrip())
        for r in refs:
            self.say(f"Successfully tagged {r}")
        print(image_id[7:] if not self.opts.quiet else image_id, file=self.out, flush=True)
        return image_id

    def _load(self, image_id: str) -> State:
        cfg = json.loads(self.store.blob(image_id))
        img = self.store.image(image_id)
        st = State(image_id, cfg, list(img.layers))
        shell = (cfg.get("config") or {}).get("Shell")
        if shell:
            st.shell = list(shell)
        return st

    def _step(self, prefix: str, ins: Instruction) -> None:
        self.step_no += 1
        self.say(f"{prefix}STEP {self.step_no}/{self.steps_total}: {ins.original}")

    def build_stage(self, df: Dockerfile, meta: dict[str, str], s: Stage, multi: bool, stages: list[Stage]) -> str:
        prefix = f"[{s.index + 1}/{len(stages)}] " if multi else ""
        self._step(prefix, s.from_ins)
        base = self._word(df, s.from_ins, s.from_ins.rest.split()[0], meta)
        plat = s.from_ins.flag("platform")
        if plat:
            plat = self._word(df, s.from_ins, plat, meta)
            if tuple(plat.split("/")[:2]) != PLATFORM:
                raise df.error(s.from_ins, f"--platform {plat}: only linux/amd64 (this host) can be built")
        dep = self._stage_ref(stages[:s.index + 1], base, s)
        if dep is not None:
            state = self._load(self.stage_images[str(dep.index)])
        elif base.lower() == "scratch":
            state = State(None, scratch_config(self.platform), [])
        else:
            try:
                image_id = self.store.resolve(base)
            except ImageError:
                raise df.error(s.from_ins, f"{base}: no such image in the store (unionfs pull or load it "
                                           "first)") from None
            state = self._load(image_id)
            arch = state.config.get("architecture")
            if arch and arch != self.platform[1]:
                raise df.error(s.from_ins, f"{base}: the image is for {state.config.get('os')}/{arch}, not "
                                           f"{'/'.join(self.platform)}")
        self.say(f"--> {state.image_id[7:19] if state.image_id else 'scratch'}" if state.image_id else "--> scratch")
        body = list(s.body)
        triggers = state.inner.get("OnBuild") or []
        if triggers:
            state.inner["OnBuild"] = None
            pre = [parse_trigger(t, df.path, s.from_ins.line) for t in triggers]
            self.steps_total += len(pre)
            body = pre + body
        for ins in body:
            self._step(prefix, ins)
            state = self.run_instruction(df, meta, state, ins)
        if state.image_id is None:
            return ""
        return state.image_id

    # --- committing ------------------------------------------------------------------

    def commit_step(self, state: State, key_parts, created_by: str, change: Callable[[dict], None] | None = None,
                    make_layer: Callable[[], Layer | None] | None = None, author: str | None = None) -> State:
        """A new image: ``state`` plus ``change`` to its config and the layer ``make_layer`` adds to the store,
        if any; then a cache entry for it.  All under one hold of the lock: a layer no image references yet
        would be collected by the next writer."""
        with self.store.locked():
            layer = make_layer() if make_layer is not None else None
            return self._commit_locked(state, key_parts, created_by, change, layer, author)

    def _commit_locked(self, state: State, key_parts, created_by: str, change, layer: Layer | None,
                       author: str | None) -> State:
        cfg = new_config(state.config, layer.diff_id if layer else None, created_by,
                         created=_iso(self.now) if self.now is not None else None)
        author = author or state.config.get("author")
        if author:   # MAINTAINER's (or the base's), for every later step too
            cfg["author"] = author
        if state.image_id is None:   # FROM scratch: no history before ours
            cfg["history"] = cfg["history"][-1:]
        inner = cfg.setdefault("config", {})
        if change is not None:
            change(inner)
        for k in [k for k, v in inner.items() if v is None]:
            del inner[k]
        layers = state.layers + ([layer] if layer else [])
        image_id = register_config(self.store, cfg, layers)
        if key_parts is not None:
            cache.record(self.store, cache.key(state.image_id, key_parts), image_id, state.image_id)
        new = State(image_id, cfg, layers, dict(state.args), list(state.shell), state.cmd_set)
        self.say(f"--> {image_id[7:19]}")
        return new

    def cached(self, state: State, key_parts) -> State | None:
        if self.opts.no_cache:
            return None
        image_id = cache.lookup(self.store, cache.key(state.image_id, key_parts))
        if image_id is None:
            return None
        new = self._load(image_id)
        new.args, new.shell, new.cmd_set = dict(state.args), list(state.shell), state.cmd_set
        shell = new.inner.get("Shell")
        if shell:
            new.shell = list(shell)
        self.say(f"--> Using cache {image_id[7:]}")
        self.say(f"--> {image_id[7:19]}")
        return new

    def meta_step(self, state: State, ins: Instruction, text: str, change: Callable[[dict], None]) -> State:
        """A config-only step: cached by (parent, instruction), history ``#(nop)``."""
        parts = (ins.cmd, text)
        hit = self.cached(state, parts)
        if hit is not None:
            return hit
        return self.commit_step(state, parts, f"{NOP} {ins.cmd} {text}", change)

    # --- instructions ----------------------------------------------------------------

    def run_instruction(self, df: Dockerfile, meta: dict[str, str], state: State, ins: Instruction) -> State:
        v = state.vars()
        cmd = ins.cmd
        if cmd == "ARG":
            out = []
            for k, default in _pairs(df, ins, v):
                if k in self.opts.build_args:
                    val = self.opts.build_args[k]
                    self.used_args.add(k)
                elif default is not None:
                    val = default
                elif k in meta:
                    val = meta[k]
                else:
                    val = None
                if val is not None:
                    state.args[k] = val
                out.append(k if default is None else f"{k}={default}")
            return self.meta_step(state, ins, " ".join(out), lambda c: None)
        if cmd == "ENV":
            pairs = _pairs(df, ins, v)

            def set_env(c: dict) -> None:
                env = list(c.get("Env") or [])
                for k, val in pairs:
                    for i, e in enumerate(env):
                        if e.partition("=")[0] == k:
                            env[i] = f"{k}={val}"
                            break
                    else:
                        env.append(f"{k}={val}")
                c["Env"] = env
            return self.meta_step(state, ins, " ".join(f"{k}={val}" for k, val in pairs), set_env)
        if cmd == "LABEL":
            pairs = _pairs(df, ins, v)
            return self.meta_step(state, ins, " ".join(f"{k}={val}" for k, val in pairs),
                                  lambda c: c.__setitem__("Labels", {**(c.get("Labels") or {}), **dict(pairs)}))
        if cmd == "MAINTAINER":
            parts = ("MAINTAINER", ins.rest)
            return self.cached(state, parts) or self.commit_step(state, parts, f"{NOP} MAINTAINER {ins.rest}",
                                                                 author=ins.rest)
        if cmd in ("CMD", "ENTRYPOINT"):
            value = list(ins.json) if ins.json is not None else state.shell + [ins.rest]
            field_ = "Cmd" if cmd == "CMD" else "Entrypoint"
            reset_cmd = cmd == "ENTRYPOINT" and not state.cmd_set

            def set_cmd(c: dict) -> None:
                c[field_] = value
                if reset_cmd:
                    c["Cmd"] = None
            st = self.meta_step(state, ins, "[" + " ".join(json.dumps(x) for x in value) + "]", set_cmd)
            if cmd == "CMD":
                st.cmd_set = True
            return st
        if cmd == "SHELL":
            shell = list(ins.json)
            st = self.meta_step(state, ins, "[" + " ".join(json.dumps(x) for x in shell) + "]",
                                lambda c: c.__setitem__("Shell", shell))
            st.shell = shell
            return st
        if cmd == "USER":
            user = self._word(df, ins, ins.rest, v)
            return self.meta_step(state, ins, user, lambda c: c.__setitem__("User", user))
        if cmd == "STOPSIGNAL":
            sig = self._word(df, ins, ins.rest, v)
            return self.meta_step(state, ins, sig, lambda c: c.__setitem__("StopSignal", sig))
        if cmd == "EXPOSE":
            ports = []
            given = self._words(df, ins, ins.rest, v)
            for p in given:
                num, _, proto = p.partition("/")
                if not re.fullmatch(r"\d+(-\d+)?", num) or proto.lower() not in ("", "tcp", "udp", "sctp"):
                    raise df.error(ins, f"{p!r} is not PORT[/tcp|udp|sctp]")
                ports.append(f"{num}/{proto.lower() or 'tcp'}")
            return self.meta_step(state, ins, " ".join(given), lambda c: c.__setitem__(
                "ExposedPorts", {**(c.get("ExposedPorts") or {}), **{p: {} for p in ports}}))
        if cmd == "VOLUME":
            vols = ([self._word(df, ins, x, v) for x in ins.json] if ins.json is not None
                    else self._words(df, ins, ins.rest, v))
            if not vols or any(not x for x in vols):
                raise df.error(ins, "needs a path")
            return self.meta_step(state, ins, "[" + " ".join(vols) + "]", lambda c: c.__setitem__(
                "Volumes", {**(c.get("Volumes") or {}), **{x: {} for x in vols}}))
        if cmd == "ONBUILD":
            trigger = ins.rest
            return self.meta_step(state, ins, trigger, lambda c: c.__setitem__(
                "OnBuild", list(c.get("OnBuild") or []) + [trigger]))
        if cmd == "HEALTHCHECK":
            return self.healthcheck(df, state, ins)
        if cmd == "WORKDIR":
            return self.workdir(df, state, ins, v)
        if cmd in ("COPY", "ADD"):
            return self.copy(df, state, ins, v)
        if cmd == "RUN":
            return self.run(df, state, ins)
        raise df.error(ins, "not supported")

    def healthcheck(self, df: Dockerfile, state: State, ins: Instruction) -> State:
        word_, _, rest = ins.rest.partition(" ")
        if word_.upper() == "NONE":
            hc: dict = {"Test": ["NONE"]}
        else:
            rest = rest.strip()
            j = json_array(rest)
            hc = {"Test": ["CMD", *j] if j is not None else ["CMD-SHELL", rest]}
            names = {"interval": "Interval", "timeout": "Timeout", "start-period": "StartPeriod",
                     "start-interval": "StartInterval"}
            for k, val in ins.flags:
                if k == "retries":
                    if not val.isdigit():
                        raise df.error(ins, f"--retries={val}: not a number")
                    hc["Retries"] = int(val)
                else:
                    try:
                        hc[names[k]] = _duration(val, f"--{k}")
                    except UsageError as e:
                        raise df.error(ins, str(e)) from None
        text = json.dumps(hc, sort_keys=True)
        return self.meta_step(state, ins, text, lambda c: c.__setitem__("Healthcheck", hc))

    def workdir(self, df: Dockerfile, state: State, ins: Instruction, v: dict[str, str]) -> State:
        path = self._word(df, ins, ins.rest, v)
        wd = posixpath.normpath(posixpath.join(state.inner.get("WorkingDir") or "/", path))
        parts = ("WORKDIR", wd)
        hit = self.cached(state, parts)
        if hit is not None:
            return hit
        members = None
        tree = ImageTree(image_lower(self.store, state.image_id) if state.layers else [])
        try:
            real = tree.resolve(wd.lstrip("/"))
            st = tree.stat(real) if real else None
            if real and st is None:
                members = copying.plan([], real + "/", "/", tree, what=f"{df.path}:{ins.line}: WORKDIR",
                                       many=False, chown=None, chmod=None, keep_owner=False,
                                       now=self._mtime()).members
        finally:
            tree.close()
        make = (lambda: self._layer(members, f"WORKDIR {wd}")) if members else None
        return self.commit_step(state, parts, f"{NOP} WORKDIR {wd}",
                                lambda c: c.__setitem__("WorkingDir", wd), make)

    def _mtime(self) -> int:
        return self.now if self.now is not None else int(time.time())

    def _layer(self, members: list[Member], what: str) -> Layer:
        """A layer tar of ``members`` into the store (the caller holds the lock)."""
        tmp = self.store.new_tmp_dir("build")
        path = os.path.join(tmp, "layer.tar")
        with open(path, "xb") as f:
            diff_id, size = write_tar(members, f, self.now)
            f.flush()
            os.fsync(f.fileno())
        try:
            return add_layer_tar(self.store, path, diff_id, size, what)
        finally:
            self.store.discard(tmp)

    # --- COPY / ADD -------------------------------------------------------------------

    def _chown(self, df: Dockerfile, ins: Instruction, spec: str, tree: ImageTree) -> tuple[int, int]:
        user, _, group = spec.partition(":")

        def lookup(db: str, name: str) -> int:
            if name.isdigit():
                return int(name)
            st = tree.stat(f"etc/{db}")
            text = b""
            if st is not None and stat.S_ISREG(st.mode):
                with tree.view.open(os.fsencode(f"etc/{db}")) as f:
                    text = f.read(4 << 20)
            for line in text.decode("utf-8", "replace").splitlines():
                f_ = line.split(":")
                if len(f_) > 2 and f_[0] == name and f_[2].isdigit():
                    return int(f_[2])
            raise df.error(ins, f"--chown={spec}: {'user' if db == 'passwd' else 'group'} {name!r} not found in "
                                f"the image's /etc/{db}")
        uid = lookup("passwd", user)
        gid = lookup("group", group) if group else uid
        return uid, gid

    def copy(self, df: Dockerfile, state: State, ins: Instruction, v: dict[str, str]) -> State:
        what = f"{df.path}:{ins.line}: {ins.cmd}"
        args = [self._word(df, ins, a, v) for a in ins.json] if ins.json is not None else \
            self._words(df, ins, ins.rest, v)
        srcs_text, dest = args[:-1], args[-1]
        if not srcs_text:
            raise df.error(ins, "needs a source and a destination")
        src_from = ins.flag("from")
        chmod = None
        if ins.flag("chmod") is not None:
            spec = self._word(df, ins, ins.flag("chmod"), v)
            if not re.fullmatch(r"[0-7]{3,4}", spec):
                raise df.error(ins, f"--chmod={spec}: give octal permission bits, e.g. 0755")
            chmod = int(spec, 8)
        workdir = state.inner.get("WorkingDir") or "/"
        trees = [ImageTree(image_lower(self.store, state.image_id) if state.layers else [])]
        try:
            tree = trees[0]
            sources, many = self._sources(df, ins, v, srcs_text, src_from, what, trees)
            chown = self._chown(df, ins, self._word(df, ins, ins.flag("chown"), v), tree) if ins.flag("chown") \
                else None
            digest = hash_entries([e for s in sources for e in s.entries])
            parts = (ins.cmd, digest, [s.base for s in sources], dest, workdir, chown, chmod, src_from)
            hit = self.cached(state, parts)
            if hit is not None:
                return hit
            kind = "multi" if len(sources) > 1 else ("dir" if sources[0].is_dir else "file")
            created_by = f"{NOP} {ins.cmd} {kind}:{digest} in {dest} "
            try:
                p = copying.plan(sources, dest, workdir, tree, what=what, many=many, chown=chown, chmod=chmod,
                                 keep_owner=src_from is not None, now=self._mtime(), extract=ins.cmd == "ADD")
            except UsageError as e:
                raise BuildError(str(e)) from None
            try:
                return self.commit_step(state, parts, created_by, None,
                                        lambda: self._layer(p.members, f"{ins.cmd} at {df.path}:{ins.line}"))
            finally:
                p.close()
        finally:
            for t in trees:
                t.close()

    def _sources(self, df: Dockerfile, ins: Instruction, v: dict[str, str], srcs_text: list[str],
                 src_from: str | None, what: str, trees: list[ImageTree]) -> tuple[list, bool]:
        """The COPY/ADD sources: from a stage or an image (``--from``), else heredocs and the context.
        Also whether several were asked for (a wildcard), which needs a directory destination."""
        sources = []
        many = False
        if src_from is not None:
            ref = self._word(df, ins, src_from, v)
            image_id = self.stage_images.get(ref.lower()) or self.stage_images.get(ref)
            if image_id is None:
                try:
                    image_id = self.store.resolve(ref)
                except ImageError:
                    raise df.error(ins, f"--from={ref}: no such stage or image") from None
            from_tree = ImageTree(image_lower(self.store, image_id) if self.store.image(image_id).layers else [])
            trees.append(from_tree)
            for s in srcs_text:
                if any(c in s for c in "*?["):
                    raise df.error(ins, f"{s}: wildcards in --from sources are not supported")
                try:
                    sources.append(copying.image_source(from_tree, s.lstrip("/"), what))
                except UsageError as e:
                    raise BuildError(str(e)) from None
            return sources, many
        for s in srcs_text:
            hd = ins.heredoc(s)
            if hd is not None:
                content = self._word(df, ins, hd.content, v) if hd.expand else hd.content
                sources.append(copying.heredoc_source(hd.name, content))
                continue
            if s.startswith(("http://", "https://", "git@")):
                raise df.error(ins, f"{s}: remote sources are not supported (no network builds)")
            try:
                matches = self.ctx.glob(s, what)
                many = many or len(matches) > 1 or any(c in s for c in "*?[")
                sources += [self.ctx.source(m, what) for m in matches]
            except ContextError as e:
                raise BuildError(str(e)) from None
        return sources, many

    # --- RUN ----------------------------------------------------------------------------

    def run(self, df: Dockerfile, state: State, ins: Instruction) -> State:
        network = ins.flag("network", "default")
        if network not in ("default", "none", "host"):
            raise df.error(ins, f"--network={network}: only none and host can be honoured here")
        if ins.flag("mount") or ins.flag("security"):
            raise df.error(ins, "--mount and --security are not supported")
        script_file = None
        if ins.json is not None:
            args = list(ins.json)
            shown = " ".join(args)
        else:
            script = ins.rest
            only = ins.heredoc(script)
            if only is not None and only.content.startswith("#!"):   # a script for its own interpreter (BuildKit)
                script_file = only.content
                args, shown = [runstep.SCRIPT], only.content
            else:
                if only is not None:            # RUN <<EOF: the heredoc is the shell script
                    script = only.content
                elif ins.heredocs:              # RUN cmd <<EOF: the shell reads the heredocs
                    script = script + "\n" + "".join(h.content + h.name + "\n" for h in ins.heredocs)
                args = state.shell + [script]
                shown = " ".join(state.shell) + " " + script
        env = state.env()
        build_args = {k: val for k, val in state.args.items() if k not in env}
        proxies = {k: val for k, val in self.opts.build_args.items() if k in PROXY_ARGS and k not in state.args}
        for k in proxies:
            self.used_args.add(k)
        declared = sorted(state.args.items())   # every ARG of the stage with a value, as buildah writes it
        created_by = (f"|{len(declared)} " + " ".join(f"{k}={val}" for k, val in declared) + " " if declared
                      else "") + shown
        parts = ("RUN", args, script_file, declared, network)
        hit = self.cached(state, parts)
        if hit is not None:
            return hit
        if not state.layers:
            raise BuildError(f"{df.path}:{ins.line}: RUN: the image has no layers (FROM scratch): nothing to run")
        if self.runtime_path is None:
            self.runtime_path = runstep.find_runtime(self.opts.runtime)
        config = dict(state.inner)
        config["Env"] = [f"{k}={val}" for k, val in {**build_args, **proxies, **env}.items()]
        return self._run_container(df, ins, state, config, args, network, parts, created_by, script_file)

    def _run_container(self, df: Dockerfile, ins: Instruction, state: State, config: dict, args: list[str],
                       network: str, parts, created_by: str, script: str | None) -> State:
        with runstep.step_container(self.store, state.image_id) as c:
            try:
                code = runstep.run(self.store, c, config, args, network, self.runtime_path, self.opts.quiet,
                                   self.out, script)
            except BuildError:
                raise
            except UsageError as e:   # e.g. a USER the image's /etc/passwd does not know
                raise BuildError(f"{df.path}:{ins.line}: RUN: {e}") from None
            if code != 0:
                raise BuildError(f"{df.path}:{ins.line}: RUN {ins.rest[:60]}: exited with status {code}", code)
            return self.commit_step(state, parts, created_by, None,
                                    lambda: container_layer(self.store, c, skip_empty=True, clamp_mtime=self.now)[0])


def build(store: Store, context_dir: str, opts: Options, out: TextIO = sys.stdout) -> str:
    if not os.path.isdir(context_dir):
        raise UsageError(f"build context {context_dir}: no such directory")
    if opts.source_date_epoch is None and os.environ.get("SOURCE_DATE_EPOCH"):
        opts.source_date_epoch = _epoch(os.environ["SOURCE_DATE_EPOCH"])
    if "SOURCE_DATE_EPOCH" in opts.build_args and opts.source_date_epoch is None:
        opts.source_date_epoch = _epoch(opts.build_args["SOURCE_DATE_EPOCH"])
    return Builder(store, context_dir, opts, out).build()


def _epoch(text: str) -> int:
    if not text.strip().isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH={text!r}: not a number of seconds")
    return int(text)
