"""The shared libraries an ELF file asks the dynamic loader for (its DT_NEEDED entries).

igfast reads them from its own extension before loading it (see _ext.py): a build
whose compiler linked the C++ runtime statically carries a private copy of it, and an
exception thrown inside such a library cannot be caught by PyTorch's copy: every
argument error of an op then ends the process (SIGSEGV) instead of raising. That
happened on a GPU machine whose default g++ was a wrapper that added the static
runtime; the system g++ built a library that raises.
"""

import struct
from typing import List, Optional

_DT_NEEDED = 1
_SHT_DYNAMIC = 6


def needed_libraries(path: str) -> Optional[List[str]]:
    """The DT_NEEDED names of a 64-bit little-endian ELF file, or None when the file is
    not one or cannot be read (then nothing is known about it)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # e_ident: magic, 64-bit class (2), little-endian (1).
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    try:
        section_offset, = struct.unpack_from("<Q", data, 0x28)
        entry_size, count = struct.unpack_from("<HH", data, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]
        names: List[str] = []
        for _, kind, _, _, offset, size, link, _, _, _ in sections:
            if kind != _SHT_DYNAMIC:
                continue
            strings_offset = sections[link][4]  # sh_link of .dynamic: its string table (.dynstr)
            for position in range(offset, offset + size, 16):
                tag, value = struct.unpack_from("<qQ", data, position)
                if tag == 0:  # DT_NULL ends the table
                    break
                if tag == _DT_NEEDED:
                    end = data.index(b"\0", strings_offset + value)
                    names.append(data[strings_offset + value:end].decode("latin-1"))
        return names
    except (struct.error, IndexError, ValueError):
        return None


def links_cxx_runtime_statically(path: str) -> bool:
    """True when a C++ library asks for no shared C++ runtime (libstdc++ or libc++): it
    then holds its own. False where that cannot be read."""
    needed = needed_libraries(path)
    if not needed:
        return False
    return not any(name.startswith(("libstdc++", "libc++")) for name in needed)
