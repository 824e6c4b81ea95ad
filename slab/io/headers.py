"""Never allocate what a header claims without checking it.

Every reader asks here before it hands a file to a decoder or allocates a volume:

- :func:`check_claim`: the bytes a header claims against the bytes the file holds. Raw data
  cannot be larger than the file; deflate (gzip, zlib, PNG) expands at most 1032 : 1, so a
  63-byte ``.nii.gz`` that claims 1.4 GB is refused as corrupt before anything is allocated.
- :func:`check_memory`: an allocation against the memory this process can have (available
  memory and swap, and the cgroup limit a container sets).
- :func:`check_metaimage` and :func:`check_nrrd`: the text headers of ``.mha``/``.mhd`` and
  ``.nrrd``/``.nhdr`` parsed and validated here first, since ITK's parsers trust them (a crafted
  ``NDims = 2147483648`` makes ITK spin for minutes or crash).
- :func:`png_claim` and :func:`tiff_claim`: the decoded size of one slice from its header.

Each failure is a :class:`SlabError` naming the file and what was expected.
"""
from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path

from slab.core.errors import SlabError

DEFLATE_RATIO = 1032  # the most deflate can expand: 258-byte matches at ~2 bits each
# LZW codes grow one byte per code up to 4096-byte strings; PackBits at most 64:1.
TIFF_RATIO = 4096
_HEADER_BYTES = 1 << 20  # the longest text header read

_METAIMAGE_TYPES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4, "MET_LONG": 4,
    "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}
_NRRD_ENCODINGS = {"raw": "raw", "txt": "text", "text": "text", "ascii": "text", "hex": "hex", "gz": "gzip",
                   "gzip": "gzip", "bz2": "bzip2", "bzip2": "bzip2"}


def gib(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB"


# ---------------------------------------------------------------------------------------------
# Memory


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes this process can still allocate: available memory plus free swap, capped by the
    cgroup (container) limit; None where the system does not say."""
    found = None
    try:
        fields = {}
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
        found = fields.get("MemAvailable", fields.get("MemFree", 0)) + fields.get("SwapFree", 0)
    except (OSError, ValueError, IndexError):
        pass
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        found = limit - used if found is None else min(found, limit - used)
    return found


STORED_SLACK = 1.01  # a compressed block is at most its raw bytes and 1 % (gzip, bz2, xz, blosc, zstd headers)


def stored_limit(raw_bytes: int) -> int:
    """The most bytes a stored (compressed) block of ``raw_bytes`` raw bytes may take on disk."""
    return int(raw_bytes * STORED_SLACK) + (64 << 10)


def read_bounded(path, limit: int, what: str) -> bytes:
    """The bytes of a block file, read only when it is a regular file of at most ``limit`` bytes
    (a symlink to ``/dev/zero``, a FIFO or a 2 GiB sparse file is refused by its ``stat``, before
    a byte is read; at most ``limit + 1`` bytes are ever read). FileNotFoundError passes through
    (a missing block is zeros)."""
    import os
    import stat

    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise SlabError(f"{path}: {what} is not a regular file")
    if info.st_size > limit:
        raise SlabError(f"{path}: {what} of {info.st_size} bytes; a block of this array holds at most {limit}")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise SlabError(f"{path}: {what} grew past {limit} bytes while read")
    return data


def check_memory(nbytes: int, what: str, hint: str = "") -> None:
    """SlabError naming ``what`` when ``nbytes`` is more than the process can allocate."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise SlabError(f"{what}: needs {gib(nbytes)} of memory, {gib(free)} available{hint}")


# ---------------------------------------------------------------------------------------------
# Claims against file sizes


def check_claim(path, claimed: int, available: int, encoding: str = "raw") -> None:
    """The ``claimed`` bytes of decoded voxels fit in ``available`` bytes of ``encoding`` data
    (``raw``, ``gzip``/``zlib``, ``text``, ``hex``, or ``other`` for codecs without a tight bound)."""
    if claimed < 0:
        raise SlabError(f"{path}: header claims a negative data size")
    bound = {"raw": available, "gzip": DEFLATE_RATIO * available + 1024, "text": (available + 1) // 2,
             "hex": available // 2, "tiff": TIFF_RATIO * available + 1024}.get(encoding)
    if bound is not None and claimed > bound:
        what = "" if encoding == "raw" else f" ({encoding})"
        raise SlabError(f"{path}: header claims {claimed} bytes of voxels, but the file holds {available} bytes "
                        f"of data{what}; truncated or corrupt")


def _positive_ints(path, key: str, text: str, count: int | None = None) -> list[int]:
    parts = text.split()
    if not parts or (count is not None and len(parts) != count) or not all(re.fullmatch(r"\d{1,12}", p)
                                                                           for p in parts):
        want = f"{count} positive integers" if count is not None else "positive integers"
        raise SlabError(f"{path}: {key} = {text[:60]!r}; expected {want}")
    values = [int(p) for p in parts]
    if min(values) < 1:
        raise SlabError(f"{path}: {key} = {text[:60]!r}; expected sizes of at least 1")
    return values


def _finite_floats(path, key: str, text: str, count: int) -> None:
    parts = text.replace(",", " ").replace("(", " ").replace(")", " ").split()
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise SlabError(f"{path}: {key} = {text[:60]!r}; expected {count} numbers") from None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise SlabError(f"{path}: {key} = {text[:60]!r}; expected {count} finite numbers")


def _read_header(path: Path, stop) -> tuple[list[str], int]:
    """The header lines of ``path`` up to the line for which ``stop(line)`` is true (included),
    and the byte length of that header."""
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    lines, offset = [], 0
    while offset < len(head):
        end = head.find(b"\n", offset)
        if end < 0:
            end = len(head) - 1
        raw = head[offset:end + 1]
        offset = end + 1
        try:
            line = raw.decode("latin-1").rstrip("\r\n")
        except UnicodeDecodeError:  # latin-1 decodes anything; kept for clarity
            raise SlabError(f"{path}: header is not text") from None
        lines.append(line)
        if stop(line):
            return lines, offset
    return lines, offset


def _data_file(header: Path, name: str, what: str) -> Path:
    if re.search(r"%\d*d|\s|^LIST$", name):
        raise SlabError(f"{header}: {what} = {name!r}; slab reads one data file (or the data in the header file)")
    path = (header.parent / name) if not Path(name).is_absolute() else Path(name)
    if not path.is_file():
        raise SlabError(f"{header}: its data file {path} is missing")
    return path


def check_metaimage(path) -> dict:
    """Validate a MetaImage header (``.mha``/``.mhd``) before ITK reads it; returns its fields.

    NDims 2 to 4, DimSize with NDims positive sizes, a known ElementType, sane channels, spacing
    and matrices of the right length, one data file, and no more voxels than its data can hold.
    """
    path = Path(path)
    lines, header_bytes = _read_header(path, lambda line: line.split("=")[0].strip().lower() == "elementdatafile")
    fields = {}
    for line in lines:
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise SlabError(f"{path}: header line {line[:60]!r} is not 'Key = Value'; not a MetaImage file")
        fields[key.strip().lower()] = value.strip()
    if "elementdatafile" not in fields:
        raise SlabError(f"{path}: no ElementDataFile in the header; not a MetaImage file")
    if not re.fullmatch(r"\d{1,2}", fields.get("ndims", "")) or not 2 <= int(fields["ndims"]) <= 4:
        raise SlabError(f"{path}: NDims = {fields.get('ndims', '(missing)')[:20]!r}; expected 2, 3 or 4")
    ndims = int(fields["ndims"])
    sizes = _positive_ints(path, "DimSize", fields.get("dimsize", ""), ndims)
    element = fields.get("elementtype", "").upper()
    if element not in _METAIMAGE_TYPES:
        raise SlabError(f"{path}: ElementType = {element[:30]!r}; expected one of {', '.join(_METAIMAGE_TYPES)}")
    channels = 1
    if "elementnumberofchannels" in fields:
        channels = _positive_ints(path, "ElementNumberOfChannels", fields["elementnumberofchannels"], 1)[0]
        if channels > 1024:
            raise SlabError(f"{path}: ElementNumberOfChannels = {channels}; expected at most 1024")
    for key, count in (("elementspacing", ndims), ("offset", ndims), ("position", ndims), ("origin", ndims),
                       ("transformmatrix", ndims * ndims), ("rotation", ndims * ndims),
                       ("orientation", ndims * ndims)):
        if key in fields:
            _finite_floats(path, key, fields[key], count)
    claimed = math.prod(sizes) * channels * _METAIMAGE_TYPES[element]
    name = fields["elementdatafile"]
    if name.upper() == "LOCAL":
        available = path.stat().st_size - header_bytes
    else:
        available = _data_file(path, name, "ElementDataFile").stat().st_size
    header_size = fields.get("headersize", "0")
    if not re.fullmatch(r"-?\d{1,12}", header_size) or int(header_size) < -1:
        raise SlabError(f"{path}: HeaderSize = {header_size[:20]!r}; expected an integer >= -1")
    for key in ("binarydata", "binarydatabyteordermsb", "elementbyteordermsb", "compresseddata"):
        if key in fields and fields[key].lower() not in ("true", "false", "1", "0"):
            raise SlabError(f"{path}: {key} = {fields[key][:20]!r}; expected True or False")
    compressed = fields.get("compresseddata", "false").lower() in ("true", "1")
    binary = fields.get("binarydata", "true").lower() in ("true", "1")
    encoding = "gzip" if compressed else "raw" if binary else "text"
    if encoding == "text":
        claimed = math.prod(sizes) * channels  # one value per at least two characters
    check_claim(path, claimed, max(0, available - max(0, int(header_size))), encoding)
    return {"sizes": sizes, "channels": channels, "claimed": claimed}


def check_nrrd(path) -> dict:
    """Validate a NRRD header (``.nrrd``/``.nhdr``) before ITK reads it; returns its fields.

    The ``NRRD000N`` magic, dimension 1 to 16, that many positive sizes, a known type and
    encoding, one data file, and no more voxels than its data can hold.
    """
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(8)
    if not re.fullmatch(rb"NRRD000\d", magic):
        raise SlabError(f"{path}: not a NRRD file (no NRRD000N magic)")
    lines, header_bytes = _read_header(path, lambda line: line.strip() == "")
    fields = {}
    for line in lines[1:]:
        if not line.strip() or line.startswith("#") or ":=" in line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise SlabError(f"{path}: header line {line[:60]!r} is not 'field: value'")
        fields[key.strip().lower()] = value.strip()
    dimension = fields.get("dimension", "")
    if not re.fullmatch(r"\d{1,2}", dimension) or not 1 <= int(dimension) <= 16:
        raise SlabError(f"{path}: dimension: {dimension[:20]!r}; expected 1 to 16")
    sizes = _positive_ints(path, "sizes", fields.get("sizes", ""), int(dimension))
    kind = fields.get("type", "").lower()
    if kind not in _NRRD_TYPES:
        raise SlabError(f"{path}: type: {kind[:30]!r}; expected a NRRD type such as uint16 or float")
    encoding = _NRRD_ENCODINGS.get(fields.get("encoding", "").lower())
    if encoding is None:
        raise SlabError(f"{path}: encoding: {fields.get('encoding', '(missing)')[:30]!r}; expected raw, ascii, hex, "
                        "gzip or bzip2")
    name = fields.get("data file", fields.get("datafile"))
    available = path.stat().st_size - header_bytes if name is None else \
        _data_file(path, name, "data file").stat().st_size
    claimed = math.prod(sizes) * _NRRD_TYPES[kind]
    if encoding == "text":
        claimed = math.prod(sizes)  # one value per at least two characters
    check_claim(path, claimed, max(0, available), {"bzip2": "other"}.get(encoding, encoding))
    return {"sizes": sizes, "claimed": math.prod(sizes) * _NRRD_TYPES[kind]}


# ---------------------------------------------------------------------------------------------
# Slices


def png_claim(path, data: bytes) -> int:
    """Decoded bytes of a PNG from its IHDR chunk, checked against the compressed size."""
    if len(data) < 33 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise SlabError(f"{path}: not a readable .png image (no PNG signature and IHDR chunk)")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
    if width < 1 or height < 1 or samples is None or depth not in (1, 2, 4, 8, 16):
        raise SlabError(f"{path}: PNG header says {width}x{height}, bit depth {depth}, colour type {colour}; "
                        "not a valid image")
    claimed = width * height * samples * max(1, depth // 8)
    check_claim(path, claimed, len(data), "gzip")
    return claimed


def jpeg2k_claim(path, data: bytes) -> int:
    """Decoded bytes of a JPEG 2000 image (a ``.jp2`` file's ``ihdr`` box or a raw codestream's SIZ
    marker), checked against the memory this process has (JPEG 2000 has no tight ratio bound)."""
    width = height = components = depth = None
    if data[:4] == b"\x00\x00\x00\x0c" and data[4:8] == b"jP  ":
        at = data.find(b"ihdr", 0, 1 << 16)
        if at >= 0 and len(data) >= at + 4 + 12:
            height, width, components, bpc = struct.unpack(">IIHB", data[at + 4: at + 15])
            depth = (bpc & 0x7F) + 1
    elif data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 4 + 38 + 3:
        _, _, xsiz, ysiz, xo, yo = struct.unpack(">HHIIII", data[4:24])
        (components,) = struct.unpack(">H", data[40:42])
        width, height, depth = xsiz - xo, ysiz - yo, (data[42] & 0x7F) + 1
    if width is None:
        raise SlabError(f"{path}: not a readable JPEG 2000 image (no JP2 signature or codestream SIZ marker)")
    if width < 1 or height < 1 or not components or depth > 38:
        raise SlabError(f"{path}: JPEG 2000 header says {width}x{height}, {components} components of {depth} bits; "
                        "not a valid image")
    claimed = width * height * components * (1 if depth <= 8 else 2 if depth <= 16 else 4)
    check_memory(claimed, str(path))
    return claimed


def tiff_claim(path, page) -> int:
    """Decoded bytes of a tifffile page, checked against the file size for its compression."""
    shape = tuple(int(s) for s in page.shape)
    if not shape or min(shape) < 1:
        raise SlabError(f"{path}: TIFF page of shape {shape}; expected a 2D image")
    claimed = math.prod(shape) * page.dtype.itemsize
    raw = int(getattr(page, "compression", 1)) == 1
    check_claim(path, claimed, os.path.getsize(path), "raw" if raw else "tiff")
    return claimed


_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4)}  # SHORT, LONG: the types of the tags read below


def tiff_header(path, data: bytes) -> dict | None:
    """The first image's ``width``, ``height``, ``samples``, ``bits``, ``compression``,
    ``sample_format`` and ``pages`` (1 or "more") from a classic TIFF's first IFD, read with
    ``struct`` alone (no decoder, no allocation); None for what it does not read (BigTIFF,
    tags stored out of line), which the caller reads with tifffile instead."""
    if len(data) < 8 or data[:2] not in (b"II", b"MM"):
        return None
    order = "<" if data[:2] == b"II" else ">"
    magic, offset = struct.unpack(order + "HI", data[2:8])
    if magic != 42 or offset + 2 > len(data):
        return None
    (count,) = struct.unpack(order + "H", data[offset:offset + 2])
    end = offset + 2 + 12 * count
    if end + 4 > len(data):
        return None
    tags = {}
    for i in range(count):
        tag, kind, n = struct.unpack(order + "HHI", data[offset + 2 + 12 * i: offset + 10 + 12 * i])
        if tag in (256, 257, 258, 259, 277, 339) and kind in _TIFF_TYPES:
            fmt, size = _TIFF_TYPES[kind]
            if n * size > 4 and tag != 258:
                return None
            value = data[offset + 10 + 12 * i: offset + 14 + 12 * i]
            if n * size > 4:  # BitsPerSample of several samples, stored elsewhere: all equal in practice
                (pointer,) = struct.unpack(order + "I", value)
                value = data[pointer:pointer + size]
                if len(value) < size:
                    return None
            tags[tag] = struct.unpack(order + fmt, value[:size])[0]
    if 256 not in tags or 257 not in tags:
        return None
    (next_ifd,) = struct.unpack(order + "I", data[end:end + 4])
    return {"width": tags[256], "height": tags[257], "bits": tags.get(258, 1), "compression": tags.get(259, 1),
            "samples": tags.get(277, 1), "sample_format": tags.get(339, 1), "pages": 1 if next_ifd == 0 else "more"}


def tiff_bytes_claim(path, data: bytes, header: dict) -> int:
    """Decoded bytes a :func:`tiff_header` claims, checked against the file size for its compression."""
    width, height = header["width"], header["height"]
    if width < 1 or height < 1:
        raise SlabError(f"{path}: TIFF header says {width}x{height}; expected a 2D image")
    claimed = width * height * header["samples"] * max(1, header["bits"] // 8)
    check_claim(path, claimed, len(data), "raw" if header["compression"] == 1 else "tiff")
    return claimed


__all__ = ["DEFLATE_RATIO", "available_memory", "check_memory", "check_claim", "check_metaimage", "check_nrrd",
           "png_claim", "jpeg2k_claim", "tiff_claim", "tiff_header", "tiff_bytes_claim", "gib"]
