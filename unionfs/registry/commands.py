"""The ``pull``, ``push``, ``login`` and ``logout`` subcommands: their arguments and what they print.

Wired into :mod:`unionfs.cli`.  Thin, as the rest of the command line: how to talk to a registry
is :mod:`.client`'s, what is pulled or pushed :mod:`.pull`'s and :mod:`.push`'s, credentials
:mod:`.auth`'s.
"""
from __future__ import annotations

import argparse
import getpass
import sys

from ..image.model import ImageError, Reference
from ..image.store import Store


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure", action="store_true",
                   help="allow plain HTTP and unverified TLS for this registry (test registries on localhost)")
    p.add_argument("--ca-file", metavar="FILE", help="trust this CA (PEM) for the registry's TLS certificate")


def _client(args: argparse.Namespace, registry: str, repository: str, actions: tuple[str, ...], creds=None):
    from .client import Client
    return Client(registry, repository, actions=actions, insecure=args.insecure, ca_file=args.ca_file,
                  credentials=creds)


def pull_lazy_cmd(args: argparse.Namespace, store: Store, reference: str) -> str:
    """``pull --lazy`` (also for ``mount --lazy``): the image's TOCs now, content on first read; its name."""
    from .lazy import WHOLE_BELOW, pull_lazy
    ref = Reference.parse(reference, allow_digest=True)
    quiet = getattr(args, "quiet", False)
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr))
    with _client(args, ref.registry, ref.path, ("pull",)) as client:
        r = pull_lazy(store, ref, client, getattr(args, "platform", None),
                      whole_below=WHOLE_BELOW if getattr(args, "whole_below", None) is None else args.whole_below,
                      log=say)
    say(f"layers: {r.lazy_layers} lazy, {r.whole_layers} pulled whole, {r.reused_layers} already in the store; "
        f"{r.fetched_bytes} bytes fetched")
    return ref.tagged if ref.tag else r.image_id


def _cmd_pull(args: argparse.Namespace) -> int:
    if args.lazy:
        print(pull_lazy_cmd(args, Store(getattr(args, "root", None)), args.reference))
        return 0
    from ..image import platform as platforms
    from .pull import pull
    ref = Reference.parse(args.reference, allow_digest=True)
    platforms.parse(args.platform)   # a mistake is reported before anything is fetched
    store = Store(getattr(args, "root", None))
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    if not args.quiet:
        print(f"{ref.tag or ref.digest}: Pulling from {ref.registry}/{ref.path}", file=sys.stderr)
    with _client(args, ref.registry, ref.path, ("pull",)) as client:
        result = pull(store, ref, client, args.platform, log=say)
    if args.quiet:
        print(ref)
        return 0
    print(f"Digest: {result.repo_digest.split('@')[1]}")
    status = "Downloaded newer image" if result.new_layers or result.fetched_bytes else "Image is up to date"
    print(f"Status: {status} for {ref}")
    print(f"layers: {result.new_layers} pulled, {result.reused_layers} already in the store", file=sys.stderr)
    print(str(ref))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .push import push, target_reference
    store = Store(getattr(args, "root", None))
    ref = target_reference(store, args.image, args.reference)
    if args.chunk_size is not None and args.chunk_size <= 0:
        raise ImageError(f"--chunk-size {args.chunk_size}: must be positive")
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    if not args.quiet:
        print(f"The push refers to repository [{ref.registry}/{ref.path}]", file=sys.stderr)
    image = args.image
    if args.estargz and args.reference is None:
        raise ImageError("push --estargz: give a REFERENCE (the eStargz copy is stored under it)")
    from .lazy import make_local
    make_local(store, [image], say)   # a lazy image: the rest of its layers first, with a line each
    if args.estargz:   # the eStargz copy is stored (and tagged by its reference) and pushed instead
        from ..image.convert import convert_estargz
        image = convert_estargz(store, args.image, str(ref))
    with _client(args, ref.registry, ref.path, ("pull", "push")) as client:
        result = push(store, image, ref, client, args.chunk_size, log=say)
    print(f"{ref.tag}: digest: {result.digest} size: {result.size}")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from .indexed import index_image, index_stored, push_index
    for name in ("spacing", "span"):
        if getattr(args, name) <= 0:
            raise ImageError(f"--{name} {getattr(args, name)}: must be positive")
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    store = Store(getattr(args, "root", None))
    stored = False
    if store.exists():
        try:
            image = store.image(store.resolve(args.reference))
            # an image in the store with its blobs (not pulled lazily): indexed there, pushed to its name's registry
            stored = all(store.has_blob(ly.digest) for ly in image.layers)
        except ImageError:
            pass
    ref = Reference.parse(args.reference, allow_digest=True)
    with _client(args, ref.registry, ref.path, ("pull", "push") if args.push else ("pull",)) as client:
        if stored:
            subject, layers = index_stored(store, args.reference, args.spacing, args.span, log=say)
        else:
            subject, layers = index_image(store, ref, client, args.platform, args.spacing, args.span, log=say)
        n = sum(x.index is not None for x in layers)
        if args.push:
            digest, api = push_index(client, subject, layers)
            how = "the referrers API" if api else f"the fallback tag {subject.digest.replace(':', '-', 1)}"
            say(f"index of {n} of {len(layers)} layers pushed as {digest}, found through {how}")
            print(digest)
        else:
            say(f"{n} of {len(layers)} layers can be indexed (--push to push the index)")
    return 0


def _cmd_login(args: argparse.Namespace) -> int:
    from .auth import Credentials, store_credentials
    registry = args.registry
    username = args.username
    if username is None:
        if not sys.stdin.isatty():
            raise ImageError("login: give --username (no terminal to ask on)")
        username = input("Username: ")
    if args.password_stdin:
        if args.password is not None:
            raise ImageError("login: --password and --password-stdin exclude each other")
        password = sys.stdin.read().rstrip("\n")
    elif args.password is not None:
        password = args.password
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        raise ImageError("login: give --password-stdin (no terminal to ask on)")
    if not username or not password:
        raise ImageError("login: username and password must not be empty")
    creds = Credentials(username, password, "the command line")
    with _client(args, registry, "", ("pull",), creds) as client:
        client.check_login()
    path = store_credentials(registry, creds)
    print(f"Login Succeeded (credentials stored in {path})")
    return 0


def _cmd_logout(args: argparse.Namespace) -> int:
    from .auth import remove_credentials
    if remove_credentials(args.registry):
        print(f"Removing login credentials for {args.registry}")
    else:
        print(f"Not logged in to {args.registry}")
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("pull", help="pull an image from a registry", parents=[common],
                       description="Pull [REGISTRY[:PORT]/]REPOSITORY[:TAG|@sha256:DIGEST] into the store "
                                   "(registry docker.io, tag latest by default).")
    p.add_argument("reference", metavar="REFERENCE")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="from a multi-platform image (default: this host)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the reference")
    p.add_argument("--lazy", action="store_true",
                   help="record the image with only its eStargz layers' TOCs (or gzip/zstd layers' pushed "
                        "index: unionfs index --push); content comes on first read (layers with neither, "
                        "or under 2 MiB, are pulled whole)")
    p.add_argument("--whole-below", type=int, metavar="BYTES",
                   help="with --lazy: pull layers smaller than BYTES whole (default 2 MiB; 0: none)")
    _connection(p)
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("push", help="push an image to a registry", parents=[common],
                       description="Push IMAGE (a name or id in the store) to REFERENCE "
                                   "(default: the image's name).")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("reference", metavar="REFERENCE", nargs="?")
    p.add_argument("--chunk-size", type=int, metavar="BYTES",
                   help="upload blobs larger than BYTES in chunks (default: one request per blob)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the digest line")
    p.add_argument("--estargz", action="store_true",
                   help="push an eStargz copy (stored under REFERENCE), which `mount --lazy` reads by range")
    _connection(p)
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("index", help="index an image's gzip/zstd layers for lazy mounts", parents=[common],
                       description="Index each gzip or multi-frame zstd layer of REFERENCE, an image in the "
                                   "store or else in its registry (decompressor "
                                   "checkpoints, sha256 of each span, the file table); --push puts the index "
                                   "beside the image as an artifact referring to it, for pull/mount/run --lazy.")
    p.add_argument("reference", metavar="REFERENCE")
    p.add_argument("--push", action="store_true", help="push the index to the image's repository")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="from a multi-platform image (default: this host)")
    p.add_argument("--spacing", type=int, default=4 << 20, metavar="BYTES",
                   help="uncompressed bytes between checkpoints (default 4 MiB)")
    p.add_argument("--span", type=int, default=512 << 10, metavar="BYTES",
                   help="compressed bytes per verified span, the unit of a range fetch (default 512 KiB)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the index's digest")
    _connection(p)
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("login", help="store credentials for a registry",
                       description="Check credentials against REGISTRY and keep them in "
                                   "$XDG_CONFIG_HOME/unionfs/config.json (mode 0600).")
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("--username", "-u")
    p.add_argument("--password", "-p", help="prefer --password-stdin: arguments are visible to other users")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    _connection(p)
    p.set_defaults(func=_cmd_login)

    p = sub.add_parser("logout", help="forget a registry's credentials")
    p.add_argument("registry", metavar="REGISTRY")
    p.set_defaults(func=_cmd_logout)
