"""Platforms, and choosing one image of a multi-platform index: what ``load`` and ``pull`` share.

An OCI image index (or Docker manifest list) names one manifest per platform
(``os``/``architecture``/``variant``).  Both an OCI layout's ``index.json`` and a
registry's index are resolved here, by the same rule, so an image loads and pulls
as the same platform.
"""
from __future__ import annotations

import platform as _host
from dataclasses import dataclass

from .model import MAX_IMAGES, ImageError, check_descriptor, field_of, quote

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)

    def matches(self, desc: dict) -> bool:
        p = desc.get("platform")
        p = p if isinstance(p, dict) else {}
        return p.get("os") == self.os and p.get("architecture") == self.architecture and \
            (self.variant is None or p.get("variant") == self.variant)


def host() -> Platform:
    m = _host.machine()
    return Platform("linux", _ARCH.get(m, m))


def parse(text: str | None) -> Platform:
    """``--platform OS/ARCH[/VARIANT]``; None or empty: this host's."""
    if not text:
        return host()
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ImageError(f"--platform {text!r}: expected OS/ARCH or OS/ARCH/VARIANT (e.g. linux/amd64)")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def _described(desc: dict) -> str:
    p = desc.get("platform")
    if not isinstance(p, dict):
        return ""
    return "/".join(str(x)[:40] for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)


def pick(index: dict, want: Platform, where: str, any_single: bool = False) -> dict:
    """The descriptor of ``index`` for ``want``.

    An index of one manifest without a platform (umoci's ``index.json``) gives that one;
    ``any_single``: an index of one manifest gives it whatever its platform (``load`` of a
    layout takes the image it holds, as ``docker load`` does; ``pull`` asks for a platform).
    """
    manifests = [check_descriptor(d, where) for d in field_of(index, "manifests", list, where, [])[:MAX_IMAGES]]
    if not manifests:
        raise ImageError(f"{where}: empty image index")
    for d in manifests:
        if want.matches(d):
            return d
    if len(manifests) == 1 and (any_single or not isinstance(manifests[0].get("platform"), dict)):
        return manifests[0]
    have = sorted({_described(d) for d in manifests} - {""})
    listed = ", ".join(quote(h) if not h.isprintable() else h for h in have[:20]) + (", ..." if len(have) > 20 else "")
    raise ImageError(f"{where}: no image for {want} (the index has {listed or 'no platforms'})")
