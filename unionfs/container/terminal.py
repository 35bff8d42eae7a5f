"""A container's terminal (``-t``): the runtime's pty master, received on a console socket, and a copy loop.

The OCI runtime makes the pty inside the container (``process.terminal``) and sends its
master over ``--console-socket`` (SCM_RIGHTS).  We set its window size from ours and
follow SIGWINCH, put our own terminal in raw mode (so Ctrl-C, Ctrl-D, Ctrl-Z reach the
container's line discipline as bytes, as with ``docker run -it``), and copy bytes both
ways until the container side closes.  Without a terminal of ours (a pipe, or a
detached container) the output is copied alone.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import struct
import tempfile
import termios
import threading
import tty
from contextlib import contextmanager
from typing import Callable, Iterator


class ConsoleSocket:
    """A listening unix socket in a private directory; :meth:`receive` returns the master the runtime sends."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="unionfs-console-")
        self.path = os.path.join(self.dir, "sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)

    def receive(self, timeout: float = 60.0) -> int:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise OSError(errno.EPROTO, "the runtime sent no terminal")
        return fds[0]

    def close(self) -> None:
        self.sock.close()
        for p in (self.path, self.dir):
            try:
                os.unlink(p) if p == self.path else os.rmdir(p)
            except OSError:
                pass


def copy_winsize(src_fd: int, dst_fd: int) -> None:
    try:
        size = fcntl.ioctl(src_fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        fcntl.ioctl(dst_fd, termios.TIOCSWINSZ, size)
    except OSError:
        pass


@contextmanager
def raw_terminal(fd: int | None) -> Iterator[None]:
    """Our terminal in raw mode for the duration (restored however we leave)."""
    if fd is None or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextmanager
def follow_winsize(src_fd: int | None, master: int) -> Iterator[None]:
    """SIGWINCH on our terminal resizes the container's (only from the main thread, where signals land)."""
    if src_fd is None or not os.isatty(src_fd) or threading.current_thread() is not threading.main_thread():
        yield
        return
    copy_winsize(src_fd, master)
    old = signal.signal(signal.SIGWINCH, lambda *_: copy_winsize(src_fd, master))
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, old)


def pump(master: int, stdin_fd: int | None, write: Callable[[bytes], None], stop: threading.Event) -> None:
    """Copy ``stdin_fd`` to the master and the master to ``write`` until the pty closes (EIO) or ``stop``
    is set and nothing is left to read."""
    inputs = [master] + ([stdin_fd] if stdin_fd is not None else [])
    while True:
        try:
            ready, _, _ = select.select(inputs, [], [], 0.2)
        except InterruptedError:
            continue
        if not ready and stop.is_set():
            return
        if master in ready:
            try:
                data = os.read(master, 65536)
            except OSError as e:
                if e.errno in (errno.EIO, errno.EBADF):
                    return
                raise
            if not data:
                return
            write(data)
        if stdin_fd is not None and stdin_fd in ready:
            try:
                data = os.read(stdin_fd, 65536)
            except OSError:
                data = b""
            if not data:
                inputs.remove(stdin_fd)
                stdin_fd = None
                continue
            try:
                os.write(master, data)
            except OSError:
                return
