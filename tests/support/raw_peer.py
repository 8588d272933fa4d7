"""A raw replication peer for tests: speaks the frame codec over a plain socket, no daemon."""

from __future__ import annotations

import contextlib
import socket
import time

from volkeeper.core.peer import wire as pw

DEADLINE = 5.0  # the target must answer or hang up this soon


def encoded(encoder: pw.FrameEncoder, frame: pw.Frame) -> bytes:
    return b"".join(bytes(part) for part in encoder.encode(frame))


class Peer:
    """One TCP connection to the target's replication port; every read has a deadline."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.encoder = pw.FrameEncoder()
        self.decoder = pw.FrameDecoder()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, frame: pw.Frame) -> bytes:
        raw = encoded(self.encoder, frame)
        self.send_raw(raw)
        return raw

    def send_raw(self, data: bytes) -> None:
        """Send; a target that already hung up is fine (the caller checks what follows)."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def half_close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def _recv(self, deadline: float, what: str) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the target sent nothing and did not hang up: {what}")
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv(1 << 16)
        except TimeoutError:
            raise AssertionError(f"the target sent nothing and did not hang up: {what}") from None
        except ConnectionResetError:
            return b""

    def recv_frame(self, timeout: float = DEADLINE) -> pw.Frame | None:
        """The target's next frame (decoded with FrameDecoder), or None if it hung up."""
        deadline = time.monotonic() + timeout
        while (frame := self.decoder.next_frame()) is None:
            chunk = self._recv(deadline, "waiting for a frame")
            if not chunk:
                self.decoder.eof()
                return None
            self.decoder.feed(chunk)
        return frame

    def hangs_up(self, timeout: float = DEADLINE) -> list[pw.Frame]:
        """Every frame the target sends until it closes; fails if it stays open."""
        frames = []
        while (frame := self.recv_frame(timeout)) is not None:
            frames.append(frame)
        return frames
