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
    not one or cannot be read (then nothing is known about it). Reads the headers and
    the two sections it needs, not the file (a CUDA build is tens of MB)."""
    try:
        with open(path, "rb") as handle:
            def read(offset: int, size: int) -> bytes:
                handle.seek(offset)
                data = handle.read(size)
                if len(data) != size:
                    raise ValueError("truncated")
                return data

            header = read(0, 64)
            # e_ident: magic, 64-bit class (2), little-endian (1).
            if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return None
            section_offset, = struct.unpack_from("<Q", header, 0x28)
            entry_size, count = struct.unpack_from("<HH", header, 0x3A)
            table = read(section_offset, entry_size * count)
            sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * entry_size) for i in range(count)]
            names: List[str] = []
            for _, kind, _, _, offset, size, link, _, _, _ in sections:
                if kind != _SHT_DYNAMIC:
                    continue
                dynamic = read(offset, size)
                strings = read(sections[link][4], sections[link][5])  # sh_link: its string table (.dynstr)
                for position in range(0, size - 15, 16):
                    tag, value = struct.unpack_from("<qQ", dynamic, position)
                    if tag == 0:  # DT_NULL ends the table
                        break
                    if tag == _DT_NEEDED:
                        names.append(strings[value:strings.index(b"\0", value)].decode("latin-1"))
            return names
    except (OSError, struct.error, IndexError, ValueError):
        return None


def links_cxx_runtime_statically(path: str) -> bool:
    """True when a C++ library asks for no shared C++ runtime (libstdc++ or libc++): it
    then holds its own. False where that cannot be read."""
    needed = needed_libraries(path)
    if not needed:
        return False
    return not any(name.startswith(("libstdc++", "libc++")) for name in needed)
