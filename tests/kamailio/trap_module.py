"""A minimal module that speaks the message ABI (docs/abi.md) well enough to be loaded
and configured, and traps (`unreachable`) on every tg_judge: what a bug inside the
policy looks like to the host. Written as raw wasm bytes so the test needs no
toolchain beyond Python.
"""

CONFIGURED = b'{"ok":true,"generation":1}'
TICKED = b'{"ok":true}'
TICK_AT = 64


def _uleb(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _sleb(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        done = (n == 0 and not byte & 0x40) or (n == -1 and byte & 0x40)
        out.append(byte | (0 if done else 0x80))
        if done:
            return bytes(out)


def _vec(items):
    return _uleb(len(items)) + b"".join(items)


def _section(code, payload):
    return bytes([code]) + _uleb(len(payload)) + payload


def _name(text):
    return _uleb(len(text)) + text.encode()


I32, I64 = 0x7F, 0x7E


def _functype(params, results):
    return b"\x60" + _vec([bytes([p]) for p in params]) + _vec([bytes([r]) for r in results])


def _body(instructions):
    code = b"\x00" + instructions + b"\x0b"  # no locals
    return _uleb(len(code)) + code


def trapping_module():
    return _module(b"\x00")  # unreachable


# Numbers of docs/abi.md's verdict record: the allow action and, by cause name, the
# causes the tests use.
ALLOW = 0
CAUSE_CODES = {"response": 23}
NO_CAUSE = 255


def allow_record(cause):
    """docs/abi.md's verdict record of an allow for `cause`: a code (an int, e.g. one
    no version defines) or None; no code, texts or lists. allow_record(23) is the
    example docs/abi.md gives, the bytes src/wire/binary.rs's golden test pins."""
    import struct

    code = NO_CAUSE if cause is None else cause
    absent = struct.pack("<I", 0xFFFFFFFF)
    return (bytes([1, ALLOW, code, 0]) + struct.pack("<HQ", 0, 0) + absent * 5
            + struct.pack("<III", 0, 0, 0))


def fixed_verdict_module(record):
    """A module whose tg_judge answers `record` (docs/abi.md's verdict record) to
    every message: a verdict the real policy never gives, to see what the host does
    with it."""
    return _module(b"\x42" + _sleb((JUDGED_AT << 32) | len(record)), [(JUDGED_AT, record)])


JUDGED_AT = 128


def _module(judge_body, extra_data=()):
    types = [
        _functype([], [I32]),  # tg_abi_version
        _functype([I32], [I32]),  # tg_buffer
        _functype([I32], [I64]),  # tg_configure
        _functype([I32, I32, I32, I32, I64], [I64]),  # tg_judge (since ABI 2: with the local socket)
        _functype([I64], [I64]),  # tg_tick
    ]
    exports = [(b"memory", 2, 0)] + [
        (name.encode(), 0, i)
        for i, name in enumerate(["tg_abi_version", "tg_buffer", "tg_configure", "tg_judge", "tg_tick"])
    ]
    bodies = [
        b"\x41" + _sleb(3),  # i32.const 3: ABI version 3 (docs/abi.md)
        b"\x41" + _sleb(1024),  # the input buffer lives at 1024
        b"\x42" + _sleb(len(CONFIGURED)),  # (ptr 0 << 32) | len
        judge_body,
        b"\x42" + _sleb((TICK_AT << 32) | len(TICKED)),
    ]
    data = [
        b"\x00\x41" + _sleb(0) + b"\x0b" + _vec([bytes([b]) for b in CONFIGURED]),
        b"\x00\x41" + _sleb(TICK_AT) + b"\x0b" + _vec([bytes([b]) for b in TICKED]),
    ] + [b"\x00\x41" + _sleb(at) + b"\x0b" + _vec([bytes([b]) for b in text]) for at, text in extra_data]
    return b"".join([
        b"\x00asm\x01\x00\x00\x00",
        _section(1, _vec(types)),
        _section(3, _vec([_uleb(i) for i in range(len(types))])),
        _section(5, _vec([b"\x00" + _uleb(1)])),
        _section(7, _vec([_name(n.decode()) + bytes([k]) + _uleb(i) for n, k, i in exports])),
        _section(10, _vec([_body(b) for b in bodies])),
        _section(11, _vec(data)),
    ])


def with_custom_section(module, label):
    """The same module with a custom section appended: different bytes (a new
    content hash, so a new published file), same behaviour."""
    payload = _name("trunkguard-test") + label.encode()
    return module + _section(0, payload)
