"""The sandbox's wire format: frames on pipes and the strict encoding of values.

Used by the host (`passuntil.execution`), the worker and the zygote, and by the untrusted child
(from the zygote's memory); standard library only. A frame is a 4-byte big-endian length and
at most 8 MiB of JSON. Values cross in both directions as tagged JSON lists that build only plain
built-in values of exact types, nested at most 50 deep; never pickle.
"""

import json
import os
import select
import struct
import time

MAX_MESSAGE = 8 << 20
MAX_DEPTH = 50


class Timeout(Exception):
    """The wall-clock deadline passed."""


class ChildGone(Exception):
    """The other side exited or broke the protocol."""


def _read_exact(fd, n, deadline):
    chunks, left = [], n
    while left:
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            raise Timeout()
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            raise Timeout()
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise ChildGone("end of stream")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd, deadline=None):
    (n,) = struct.unpack(">I", _read_exact(fd, 4, deadline))
    if n > MAX_MESSAGE:
        raise ChildGone("message too large")
    return _read_exact(fd, n, deadline)


def write_frame(fd, data, deadline=None):
    data = struct.pack(">I", len(data)) + data
    while data:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([], [fd], [], wait)[1]:
                raise Timeout()
        data = data[os.write(fd, data[:1 << 16]):]


# ---- strict value encoding (both directions; never pickle) ---------------------------------

def encode(value, depth=0):
    """Plain built-in values only (exact types), as JSON-able tagged lists."""
    if depth > MAX_DEPTH:
        raise TypeError("nested too deeply")
    t = type(value)
    if value is None:
        return ["n"]
    if t is bool:
        return ["b", value]
    if t is int:
        return ["i", str(value)]
    if t is float:
        return ["f", repr(value)]
    if t is complex:
        return ["c", repr(value.real), repr(value.imag)]
    if t is str:
        return ["s", value]
    if t is bytes:
        return ["y", value.hex()]
    if t in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[t]
        return [tag, [encode(v, depth + 1) for v in value]]
    if t is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    raise TypeError(f"value of type {t.__name__} is not a plain value")


def _bad():
    raise ChildGone("malformed value")


def _text(v):
    return v if type(v) is str else _bad()


def decode(obj, depth=0):
    """Inverse of `encode`; builds fresh built-ins of exact types and rejects anything else."""
    if depth > MAX_DEPTH or type(obj) is not list or not obj or type(obj[0]) is not str:
        _bad()
    tag, args = obj[0], obj[1:]
    simple = {"n": lambda: None, "b": lambda v: v if type(v) is bool else _bad(),
              "i": lambda v: int(_text(v)), "f": lambda v: float(_text(v)),
              "c": lambda r, i: complex(float(_text(r)), float(_text(i))),
              "s": lambda v: _text(v), "y": lambda v: bytes.fromhex(_text(v))}
    if tag in simple:
        try:
            return simple[tag](*args)
        except (TypeError, ValueError, OverflowError):
            _bad()
    items = args[0] if len(args) == 1 and type(args[0]) is list else _bad()
    if tag == "d":
        pairs = [p if type(p) is list and len(p) == 2 else _bad() for p in items]
        try:
            return {decode(k, depth + 1): decode(v, depth + 1) for k, v in pairs}
        except TypeError:  # an unhashable key
            _bad()
    kinds = {"l": list, "t": tuple, "S": set, "F": frozenset}
    if tag not in kinds:
        _bad()
    try:
        return kinds[tag](decode(v, depth + 1) for v in items)
    except TypeError:
        _bad()


def loads(data):
    """JSON from the other side, size-limited by the framing; bad JSON is a protocol error."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise ChildGone("malformed message") from None
