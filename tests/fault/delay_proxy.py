"""A TCP proxy that delays every byte by a settable time: netem's delay, in userspace.

Run as a process of its own inside a node's namespace (``DelayProxy`` below does that):
``python delay_proxy.py TARGET_HOST TARGET_PORT`` listens on a free loopback port, prints
``{"port": N}``, and forwards each connection to the target.  Each direction of a connection
has a reader thread, which stamps every chunk it reads with the time it is due (now + the
delay) and queues it, and a writer thread, which sends chunks in order once due -- so bytes
keep their order and the delay holds for a busy stream as for a quiet one.  Either side
closing (or failing) closes both.  Commands on stdin: ``delay MS`` (answers ``{"delay_ms":
MS}``); stdin closing ends the process.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CHUNK = 1 << 16


class Pipe:
    """One direction of one connection."""

    def __init__(self, source: socket.socket, sink: socket.socket, proxy: Proxy) -> None:
        self.source, self.sink, self.proxy = source, sink, proxy
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = threading.Condition()
        self.done = False

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.source.recv(CHUNK):
                with self.ready:
                    self.queue.append((time.monotonic() + self.proxy.delay, data))
                    self.ready.notify()
        with self.ready:
            self.done = True
            self.ready.notify()

    def _write(self) -> None:
        try:
            while True:
                with self.ready:
                    while not self.queue and not self.done:
                        self.ready.wait()
                    if not self.queue:
                        break
                    due, data = self.queue.popleft()
                time.sleep(max(0.0, due - time.monotonic()))
                self.sink.sendall(data)
        except OSError:
            pass
        for sock in (self.source, self.sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Proxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.delay = 0.0
        self.listener = socket.create_server(("127.0.0.1", 0))

    def serve(self) -> None:
        while True:
            client, _ = self.listener.accept()
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        Pipe(client, upstream, self).start()
        Pipe(upstream, client, self).start()


def main(argv: list[str]) -> int:
    proxy = Proxy((argv[0], int(argv[1])))
    threading.Thread(target=proxy.serve, daemon=True).start()
    print(json.dumps({"port": proxy.listener.getsockname()[1]}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["delay"] and len(words) == 2 and words[1].isdigit():
            proxy.delay = int(words[1]) / 1000
            print(json.dumps({"delay_ms": int(words[1])}), flush=True)
        elif words:
            print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)
    return 0


# -- the test side ---------------------------------------------------------------------------


class DelayProxy:
    """The proxy process in namespace ``netns``, forwarding to ``host:port``."""

    def __init__(self, netns: str, host: str, port: int) -> None:
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, str(Path(__file__)), host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self._answer()["port"])

    def _answer(self) -> dict[str, int]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"delay proxy exited ({self.process.wait()})")
        answer: dict[str, int] = json.loads(line)
        return answer

    def set_delay(self, milliseconds: int) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"delay {milliseconds}\n")
        self.process.stdin.flush()
        self._answer()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
