"""An in-memory volume for tests.

How this works: the contents live in one zero-filled ``bytearray`` of the volume's size.
Nothing ever blocks, so the ``*_nowait`` calls always complete, and flush and cache do
nothing.  Range checks and errors are the same as ``FileVolume``'s, so code tested against a
``MemoryVolume`` meets the same ``VolumeError`` errnos as on a real file.
"""

from __future__ import annotations

from volkeeper.io.volume import Data, Volume, check_geometry


class MemoryVolume(Volume):
    def __init__(self, name: str, size: int, sector_size: int = 512) -> None:
        check_geometry(name, size, sector_size)
        super().__init__(name, None, size, sector_size, "memory", read_only=False)
        self._data = bytearray(size)

    def read(self, offset: int, length: int) -> bytes:
        self._check("read", offset, length)
        return bytes(self._data[offset : offset + length])

    def read_nowait(self, offset: int, length: int) -> bytes:
        return self.read(offset, length)

    def write(self, offset: int, data: Data) -> None:
        view = memoryview(data).cast("B")
        self._check("write", offset, len(view), writing=True)
        self._data[offset : offset + len(view)] = view

    def write_nowait(self, offset: int, data: Data) -> int:
        self.write(offset, data)
        return memoryview(data).nbytes

    def flush(self) -> None:
        self._check("flush")

    def trim(self, offset: int, length: int) -> None:
        self._check("trim", offset, length, writing=True)
        self._data[offset : offset + length] = bytes(length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        self._check("write_zeroes", offset, length, writing=True)
        self._data[offset : offset + length] = bytes(length)

    def cache(self, offset: int, length: int) -> None:
        self._check("cache", offset, length)

    def close(self) -> None:
        self.closed = True
        self._data = bytearray()
