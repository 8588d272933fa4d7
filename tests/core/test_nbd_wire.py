"""OS errors map onto the few codes NBD defines; every command served has a name."""

from __future__ import annotations

import errno

import pytest

from volkeeper.core import nbd_wire as w


@pytest.mark.parametrize(
    ("code", "on_the_wire"),
    [
        (errno.EIO, w.Errno.EIO),
        (errno.EROFS, w.Errno.EPERM),
        (errno.EDQUOT, w.Errno.ENOSPC),
        (errno.EFBIG, w.Errno.ENOSPC),
        (errno.ESHUTDOWN, w.Errno.ESHUTDOWN),
        (errno.EBADF, w.Errno.EINVAL),  # anything else
    ],
)
def test_wire_errno(code: int, on_the_wire: w.Errno) -> None:
    assert w.wire_errno(code) is on_the_wire


def test_every_served_command_has_its_own_name() -> None:
    C = w.Command
    served = {C.READ, C.WRITE, C.FLUSH, C.TRIM, C.CACHE, C.WRITE_ZEROES}  # not DISC, BLOCK_STATUS
    assert set(w.COMMAND_NAMES) == served
    assert len(set(w.COMMAND_NAMES.values())) == len(served)
