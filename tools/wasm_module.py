"""Reading a wasm module's sections, imports and function names: what the module tools share
(tools/trap_panics.py, tools/wasm_sizes.py)."""

from trim_callbacks import leb


def sections(module):
    if module[:8] != b"\0asm\x01\0\0\0":
        raise SystemExit("not a wasm module")
    i, out = 8, []
    while i < len(module):
        sid = module[i]
        size, body = leb(module, i + 1)
        out.append((sid, i, body, body + size))
        i = body + size
    return out


def limits(module, j):
    flags = module[j]
    _, j = leb(module, j + 1)
    return leb(module, j)[1] if flags & 1 else j


def imported_functions(module, body):
    count, j = leb(module, body)
    funcs = 0
    for _ in range(count):
        for _ in range(2):  # module and field names
            n, j = leb(module, j)
            j += n
        kind = module[j]
        j += 1
        if kind == 0:
            _, j = leb(module, j)
            funcs += 1
        elif kind == 1:  # table: reference type, limits
            j = limits(module, j + 1)
        elif kind == 2:  # memory: limits
            j = limits(module, j)
        elif kind == 3:  # global: value type, mutability
            j += 2
        else:
            raise SystemExit(f"import kind {kind} not understood")
    return funcs


def function_names(module, body, end):
    n, j = leb(module, body)
    if module[j:j + n] != b"name":
        return None
    j += n
    names = {}
    while j < end:
        sub = module[j]
        size, k = leb(module, j + 1)
        if sub == 1:
            count, m = leb(module, k)
            for _ in range(count):
                index, m = leb(module, m)
                length, m = leb(module, m)
                names[index] = module[m:m + length].decode("utf-8", "replace")
                m += length
        j = k + size
    return names
