"""Sans-IO core: pure protocol and state-machine code (no asyncio, socket, os or time)."""
