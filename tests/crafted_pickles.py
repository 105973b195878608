"""Crafted pickles that run a shell command (``touch MARKER``) when unpickled naively: the
attacks a checkpoint index must refuse. Each is ``(name, bytes)`` built for one marker path."""
from __future__ import annotations

import importlib
import os
import pickle
import struct

from unetlm.checkpoint.safe import ALLOWED


def _text(s: str, proto: int) -> bytes:
    data = s.encode()
    if proto == 0:
        return b"V" + data + b"\n"  # UNICODE
    if proto < 4:
        return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _global(module: str, name: str, proto: int) -> bytes:
    if proto >= 4:
        return _text(module, proto) + _text(name, proto) + b"\x93"  # STACK_GLOBAL
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def _call(func: bytes, args: bytes, proto: int) -> bytes:
    return func + b"(" + args + b"tR"  # MARK args TUPLE REDUCE


def _program(body: bytes, proto: int) -> bytes:
    return (b"\x80" + bytes([proto]) if proto >= 2 else b"") + body + b"."


class _Reduces:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def corpus(marker) -> list[tuple[str, bytes]]:
    command = f"touch {marker}"
    out = []
    # 1. dotted names through every allowed module that reaches os (protocol 4 and 5 resolve them)
    for module in sorted({m for m, _ in ALLOWED}):
        try:
            reaches_os = hasattr(importlib.import_module(module), "os")
        except ImportError:
            continue
        for proto in (4, 5):
            if reaches_os:
                body = _call(_global(module, "os.system", proto), _text(command, proto), proto)
                out.append((f"dotted {module}:os.system p{proto}", _program(body, proto)))
    # 2. a plain reduce to os.system, pickled by Python at every protocol
    for proto in range(6):
        out.append((f"reduce os.system p{proto}", pickle.dumps(_Reduces(command), protocol=proto)))
    # 3. an allowed class called on what a nested REDUCE returns
    inner = _call(_global("os", "system", 4), _text(command, 4), 4)
    out.append(("nested reduce", _program(_call(_global("torch.distributed.checkpoint.metadata", "MetadataIndex", 4),
                                                 inner, 4), 4)))
    # 4. BUILD that plants __setstate__ on an allowed object, then a second BUILD that calls it
    obj = _call(_global("collections", "OrderedDict", 4), b"", 4)
    plant = b"}" + _text("__setstate__", 4) + _global("os", "system", 4) + b"s" + b"b"  # dict, SETITEM, BUILD
    out.append(("build with __setstate__", _program(obj + plant + _text(command, 4) + b"b", 4)))
    # 5. the INST (protocol 0) and OBJ (protocol 1) opcodes
    out.append(("inst", b"(" + _text(command, 0) + b"ios\nsystem\n."))
    out.append(("obj", b"(" + _global("os", "system", 1) + _text(command, 1) + b"o."))
    return out
