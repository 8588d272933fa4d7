"""The replication protocol's public module: the rest of volkeeper imports it alone.

How this works: it re-exports everything of ``layout`` (header, bodies' Structs, flags,
enums), ``frames`` and ``session_frames`` (one frozen dataclass per frame type, the
``Frame`` union, ``FrameEncoder``) and ``decoder`` (``FrameDecoder``), so that ``from
volkeeper.core.peer import wire as pw`` names the whole protocol.  It holds no code: the
mypyc build leaves it pure Python, because mypyc cannot compile star imports between
compiled modules (volkeeper_lab/compile.py).
"""

from volkeeper.core.peer.decoder import FrameDecoder as FrameDecoder
from volkeeper.core.peer.frames import *
from volkeeper.core.peer.layout import *
from volkeeper.core.peer.session_frames import *
