"""The replication protocol between a mirror's source and target, sans-IO.

``layout`` holds the header, every body's Structs, the flags and enums; ``frames`` one frozen
dataclass per frame type and the encoder; ``wire`` the incremental decoder and, re-exported,
all of the above: the one module the rest of volkeeper imports (``from volkeeper.core.peer
import wire as pw``).  The link that carries frames is io/peer_link.py.
"""
