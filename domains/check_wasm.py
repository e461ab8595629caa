#!/usr/bin/env python3
"""Check that wasm files are Metta domains of ABI v1 (proto/src/abi.rs).

For each file: every import is a function of module "metta" with one of the
ABI v1 names and exactly its signature (no memory, table or global imports);
the module exports `memory` and `metta_activate: (i32) -> i32`. Prints one
line per file (size, imports used, other exports, mutable globals) and exits
non-zero on the first violation.

Usage: check_wasm.py FILE.wasm...
"""
import sys

I32, I64 = 0x7F, 0x7E
NAMES = {I32: "i32", I64: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128",
         0x70: "funcref", 0x6F: "externref"}

# ABI v1: name -> (params, results)
IMPORTS = {
    "log": ((I32, I32), ()),
    "now": ((), (I64,)),
    "timer": ((I64,), ()),
    "open": ((I32, I32), (I32,)),
    "send": ((I32, I32, I32), (I32,)),
    "recv": ((I32, I32, I32), (I32,)),
    "peek": ((I32,), (I32,)),
    "reply_to": ((I32,), (I32,)),
}
ACTIVATE = ((I32,), (I32,))


class Reader:
    def __init__(self, data, pos=0, end=None):
        self.data, self.pos = data, pos
        self.end = len(data) if end is None else end

    def byte(self):
        if self.pos >= self.end:
            raise ValueError("truncated")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uleb(self):
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    def bytes(self, n):
        if self.pos + n > self.end:
            raise ValueError("truncated")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def name(self):
        return self.bytes(self.uleb()).decode("utf-8")

    def limits(self):
        flags = self.byte()
        self.uleb()
        if flags & 1:
            self.uleb()


def sig(t):
    p, r = t
    return "(%s) -> (%s)" % (", ".join(NAMES.get(x, hex(x)) for x in p),
                             ", ".join(NAMES.get(x, hex(x)) for x in r))


def check(path):
    data = open(path, "rb").read()
    if data[:4] != b"\0asm" or data[4:8] != b"\x01\0\0\0":
        raise ValueError("not a wasm v1 module")
    r = Reader(data, 8)
    types, imports, funcs, exports, globals_ = [], [], [], [], []
    memory = None  # (initial pages, maximum pages or None)
    while r.pos < len(data):
        sid, size = r.byte(), r.uleb()
        s = Reader(data, r.pos, r.pos + size)
        r.pos += size
        if sid == 1:  # type
            for _ in range(s.uleb()):
                if s.byte() != 0x60:
                    raise ValueError("non-function type")
                params = tuple(s.byte() for _ in range(s.uleb()))
                results = tuple(s.byte() for _ in range(s.uleb()))
                types.append((params, results))
        elif sid == 2:  # import
            for _ in range(s.uleb()):
                mod, name, kind = s.name(), s.name(), s.byte()
                if kind == 0:
                    imports.append((mod, name, "func", types[s.uleb()]))
                else:
                    imports.append((mod, name, {1: "table", 2: "memory", 3: "global"}.get(kind, "?"), None))
                    break  # any non-function import is already a violation
        elif sid == 3:  # function
            funcs = [s.uleb() for _ in range(s.uleb())]
        elif sid == 5:  # memory
            if s.uleb() != 1:
                raise ValueError("not exactly one memory")
            flags = s.byte()
            minimum = s.uleb()
            memory = (minimum, s.uleb() if flags & 1 else None)
        elif sid == 6:  # global
            for _ in range(s.uleb()):
                s.byte()  # value type
                globals_.append(s.byte() == 1)  # mutable?
                # skip the init expression up to `end`
                while True:
                    op = s.byte()
                    if op == 0x0B:
                        break
                    if op in (0x41, 0x42, 0x23):
                        s.uleb()
                    elif op == 0x44:
                        s.bytes(8)
                    elif op == 0x43:
                        s.bytes(4)
        elif sid == 7:  # export
            for _ in range(s.uleb()):
                name, kind, idx = s.name(), s.byte(), s.uleb()
                exports.append((name, kind, idx))

    problems = []
    nfunc_imports = 0
    for mod, name, kind, t in imports:
        if mod != "metta":
            problems.append("imports %s.%s from outside module \"metta\"" % (mod, name))
        elif kind != "func":
            problems.append("imports a %s (%s)" % (kind, name))
        elif name not in IMPORTS:
            problems.append("imports metta.%s, not in ABI v1" % name)
        elif t != IMPORTS[name]:
            problems.append("metta.%s has signature %s, ABI v1 says %s" % (name, sig(t), sig(IMPORTS[name])))
        if kind == "func":
            nfunc_imports += 1
    exp = {name: (kind, idx) for name, kind, idx in exports}
    if exp.get("memory", (None,))[0] != 2:
        problems.append("does not export memory")
    act = exp.get("metta_activate")
    if act is None or act[0] != 0:
        problems.append("does not export function metta_activate")
    else:
        idx = act[1]
        t = imports[idx][3] if idx < nfunc_imports else types[funcs[idx - nfunc_imports]]
        if t != ACTIVATE:
            problems.append("metta_activate has signature %s, ABI v1 says (i32) -> (i32)" % sig(t))
    others = sorted(n for n in exp if n not in ("memory", "metta_activate"))
    used = sorted(name for _, name, _, _ in imports)
    mem = "-" if memory is None else "%d KiB" % (memory[0] * 64)
    print("%-16s %7d bytes  memory %s  imports: %s  other exports: %s  mutable globals: %d" % (
        path, len(data), mem, ",".join(used) or "-", ",".join(others) or "-", sum(globals_)))
    return problems


def main():
    if len(sys.argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    bad = False
    for path in sys.argv[1:]:
        try:
            problems = check(path)
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            problems = ["malformed: %s" % e]
        for p in problems:
            print("  ERROR %s: %s" % (path, p), file=sys.stderr)
            bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
