"""Memory-safe loader for the MMSA feature files of CMU-MOSI / CMU-MOSEI (``aligned_50.pkl``, ``unaligned_50.pkl``).

The community files are pickles, i.e. untrusted programs for the unpickler's stack machine. They are read in three
steps, none of which lets the file choose what code runs or how much memory is taken:

1. A scan of the opcode stream (no object is built): every counted string/bytes payload must lie inside the file,
   memo indices must be dense, persistent ids, out-of-band buffers, extension codes and sets are refused, and the
   memory the unpickler will need is estimated and held to the budget below.
2. The C unpickler runs with a ``find_class`` that resolves no global at all: the numpy names an array, dtype or
   scalar pickle uses (under numpy 1's ``numpy.core`` and numpy 2's ``numpy._core``), ``_codecs.encode`` and the
   empty ``bytes()`` of protocol 2 become inert placeholders that only record their arguments; anything else (for
   instance ``os.system``) becomes a placeholder that is refused in step 3. Nothing the file names is ever called.
3. The placeholders are turned into arrays by this module, after validation: plain numeric / bool / fixed-width
   string dtypes only (no object dtype from raw bytes, no struct fields or offsets, no subarrays, no crafted dtype
   state), a byte buffer of exactly ``prod(shape) * itemsize`` bytes that was present in the file (so no stride-0
   expansion), object arrays only as lists of str (-> unicode array), bytes (-> bytes array) or numbers (->
   float64), strings at most :data:`MAX_STRING` characters, nesting at most :data:`MAX_DEPTH` levels, and every
   element visited and every byte decoded charged to the budget.

Budget: everything the loader decodes (arrays, string arrays, dtype conversions, container elements visited, 8 bytes
each) and everything the unpickler is estimated to hold may each take at most ``BUDGET_FACTOR * file size +
BUDGET_FLOOR`` bytes, i.e. 4 x the file size + 64 MiB. An honest MMSA file decodes to about 1 x its size.

Every failure of a file's content raises :class:`MMSAFileError` (a ``ValueError``, and a
``pickle.UnpicklingError`` for callers of the older contract) whose message names the file and the ``split/key``
(or the byte offset, for damage found before the key is known); numpy's MemoryError, UnicodeDecodeError,
RecursionError or OverflowError never escape raw.

File layout (MMSA's)::

    {"train": {...}, "valid": {...}, "test": {...}}      each split a dict with
    text               (N, T_t, D_t)  float   BERT features, T_t = 50, D_t = 768
    audio              (N, T_a, D_a)  float   COVAREP, D_a = 5 (MOSI) or 74 (MOSEI)
    vision             (N, T_v, D_v)  float   Facet, D_v = 20 (MOSI) or 35 (MOSEI)
    regression_labels  (N,)           float   sentiment in [-3, 3]
    id, raw_text       (N,)           str     object arrays of Python strings (or unicode arrays)
    audio_lengths, vision_lengths (N,) int    only in unaligned files (T_a, T_v differ from T_t there)

The same content is accepted as ``.npz`` (recognised by its zip signature; members are parsed here, never with
pickle) with one entry per split and key named ``"<split>/<key>"``, e.g. ``"train/text"``; strings as numpy unicode
arrays. A compressed npz counts its decompressed size against the budget. Split sizes: MOSI 1284/229/686, MOSEI
16326/1871/4659.
"""
from __future__ import annotations

import mmap
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np

from gmd_ext.apps.mosi.constants import MODALITIES

__all__ = ["load_mmsa", "MMSAFileError", "SPLITS", "MODALITIES", "REQUIRED_KEYS", "LABEL_RANGE", "BUDGET_FACTOR",
           "BUDGET_FLOOR", "MAX_DEPTH", "MAX_STRING"]

SPLITS = ("train", "valid", "test")
REQUIRED_KEYS = (*MODALITIES, "regression_labels", "id", "raw_text")
LABEL_RANGE = (-3.0, 3.0)
BUDGET_FACTOR = 4
BUDGET_FLOOR = 64 << 20
MAX_DEPTH = 32  # an MMSA file nests 3 levels (file / split / key) plus an array's state tuple
MAX_STRING = 1 << 20  # characters of one id / utterance; MOSI's longest utterance has a few hundred
_MAX_DICT_ITEMS = 1 << 16  # an MMSA file has ~30; bounds dict-building work (colliding int hashes are quadratic)
_MAX_NDIM = 32
_MAX_DIM = 1 << 40
_MAX_NPY_HEADER = 10000  # numpy's own default bound on an .npy header


class MMSAFileError(ValueError, pickle.UnpicklingError):
    """An MMSA feature file is unreadable, malformed or hostile.

    Attributes:
        path: the file.
        key: ``"split/key"`` (or a deeper path) where the problem is, ``None`` when found before any key is known.
    """

    def __init__(self, path: Path, key: str | None, what: str):
        self.path, self.key = path, key
        super().__init__(f"{path}: {key}: {what}" if key else f"{path}: {what}")


class _Budget:
    """Bytes the loader may still decode; see the module docstring for the factor."""

    def __init__(self, path: Path, file_size: int):
        self.path = path
        self.total = BUDGET_FACTOR * file_size + BUDGET_FLOOR
        self.left = self.total

    def take(self, nbytes: int, key: str | None) -> None:
        if nbytes > self.left:
            raise MMSAFileError(self.path, key, f"decoding needs more than the loader's budget of {self.total} bytes "
                                                f"({BUDGET_FACTOR} x the file size + {BUDGET_FLOOR >> 20} MiB); the file "
                                                f"asks for far more data than it holds")
        self.left -= nbytes


# ---------------------------------------------------------------------------------------------------------------
# Step 1: opcode scan.

_OPS = {ord(op.code): op for op in pickletools.opcodes}
_REFUSED_OPS = {"PERSID": "a persistent id", "BINPERSID": "a persistent id", "NEXT_BUFFER": "an out-of-band buffer",
                "READONLY_BUFFER": "an out-of-band buffer", "EXT1": "an extension code", "EXT2": "an extension code",
                "EXT4": "an extension code", "EMPTY_SET": "a set", "ADDITEMS": "a set", "FROZENSET": "a set"}
_UNICODE_OPS = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_LEN_BYTES = {pickletools.TAKEN_FROM_ARGUMENT1: (1, False), pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
              pickletools.TAKEN_FROM_ARGUMENT4U: (4, False), pickletools.TAKEN_FROM_ARGUMENT8U: (8, False)}
_OBJECT_OVERHEAD = 64  # bytes the unpickler may allocate per opcode besides the payload (a dict object is 64)


def _str_width(buf, start: int, n: int) -> int:
    # Bytes per character of the str a UTF-8 payload decodes to: lead bytes >= 0xC4 mean code points >= 256
    # (2-byte storage), >= 0xF0 code points >= 65536 (4-byte storage).
    if n == 0:
        return 1
    top = int(np.frombuffer(buf, np.uint8, n, start).max())
    return 1 if top < 0xC4 else 2 if top < 0xF0 else 4


def _scan(path: Path, budget: _Budget) -> int:
    """Walk the opcodes of the pickle in ``path`` without building anything (module docstring); returns the
    number of opcodes."""
    size = path.stat().st_size
    if size == 0:
        raise MMSAFileError(path, None, "empty file, not an MMSA feature pickle")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = estimate = puts = depth = dict_items = ops = 0
        marks: list[int] = []
        while True:
            at = pos
            if pos >= size:
                raise MMSAFileError(path, None, f"truncated pickle: no STOP opcode before the end of the file "
                                                f"(byte {size})")
            op = _OPS.get(buf[pos])
            pos += 1
            if op is None:
                raise MMSAFileError(path, None, f"not a pickle: unknown opcode {buf[at]:#04x} at byte {at}")
            if op.name in _REFUSED_OPS:
                raise MMSAFileError(path, None, f"refusing {_REFUSED_OPS[op.name]} (opcode {op.name} at byte {at}): "
                                                f"an MMSA feature pickle holds only arrays, dicts, lists, tuples, "
                                                f"strings and numbers")
            payload = 0
            n = op.arg.n if op.arg is not None else 0
            if n == pickletools.UP_TO_NEWLINE:
                lines = 2 if op.arg.name == "stringnl_noescape_pair" else 1
                start = pos
                for _ in range(lines):
                    nl = buf.find(b"\n", pos)
                    if nl < 0:
                        raise MMSAFileError(path, None, f"truncated pickle: opcode {op.name} at byte {at} has no "
                                                        f"end of line")
                    pos = nl + 1
                payload = 4 * (pos - start)
                arg = bytes(buf[start:pos]) if op.name in _PUT_OPS else None
            elif n in _LEN_BYTES:
                k, signed = _LEN_BYTES[n]
                if pos + k > size:
                    raise MMSAFileError(path, None, f"truncated pickle at byte {at} ({op.name})")
                length = int.from_bytes(buf[pos:pos + k], "little", signed=signed)
                pos += k
                if length < 0 or length > size - pos:
                    raise MMSAFileError(path, None, f"opcode {op.name} at byte {at} claims {length} bytes but the "
                                                    f"file has {size - pos} left")
                payload = length * (_str_width(buf, pos, length) if op.name in _UNICODE_OPS else 1)
                pos += length
                arg = None
            else:
                if pos + n > size:
                    raise MMSAFileError(path, None, f"truncated pickle at byte {at} ({op.name})")
                arg = int.from_bytes(buf[pos:pos + n], "little") if op.name in _PUT_OPS else None
                pos += n
            if op.name in _PUT_OPS or op.name == "MEMOIZE":
                # The unpickler sizes its memo table by the largest index; a pickler numbers entries 0, 1, 2, ...
                idx = puts if op.name == "MEMOIZE" else int(arg) if isinstance(arg, int) else _put_index(arg)
                if idx is None or idx > puts:
                    raise MMSAFileError(path, None, f"memo index at byte {at} ({op.name}) skips ahead of the "
                                                    f"{puts} entries stored so far")
                puts += idx == puts
            # Stack depth, only to count the items a dict is built from.
            before = op.stack_before
            if before and before[-1] is pickletools.stackslice:
                if not marks:
                    raise MMSAFileError(path, None, f"malformed pickle: {op.name} at byte {at} without a MARK")
                items = depth - marks[-1]
                depth = marks.pop() - before.index(pickletools.markobject)
                if op.name in ("DICT", "SETITEMS"):
                    dict_items += items // 2
            else:
                depth -= len(before)
                if op.name == "SETITEM":
                    dict_items += 1
            if depth < 0:
                raise MMSAFileError(path, None, f"malformed pickle: stack underflow at byte {at} ({op.name})")
            if op.name == "MARK":
                marks.append(depth)
            else:
                depth += len(op.stack_after)
            if dict_items > _MAX_DICT_ITEMS:
                raise MMSAFileError(path, None, f"more than {_MAX_DICT_ITEMS} dict entries (byte {at}); an MMSA file "
                                                f"has a few dozen")
            ops += 1
            estimate += _OBJECT_OVERHEAD + payload
            if estimate > budget.total:
                raise MMSAFileError(path, None, f"unpickling would need more than the loader's budget of "
                                                f"{budget.total} bytes (reached at byte {at})")
            if op.name == "STOP":
                return ops


def _put_index(line: bytes) -> int | None:
    text = line.strip()
    return int(text) if text.isdigit() and len(text) <= 12 else None


# ---------------------------------------------------------------------------------------------------------------
# Step 2: unpickling into placeholders.

class _Global:
    """What ``find_class`` returns: calling it records a :class:`_Call`; nothing is looked up or run."""
    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name

    def __call__(self, *args):
        return _Call(self, args)


class _Call:
    """A recorded constructor call (REDUCE) and the state BUILD gave it."""
    __slots__ = ("fn", "args", "state")

    def __init__(self, fn: _Global, args: tuple):
        self.fn, self.args, self.state = fn, args, None

    def __setstate__(self, state):
        self.state = state


_NUMPY_NAMES = {("numpy", "ndarray"): "ndarray", ("numpy", "dtype"): "dtype", ("_codecs", "encode"): "encode",
                ("builtins", "bytes"): "bytes", ("__builtin__", "bytes"): "bytes"}
for _core in ("numpy.core", "numpy._core"):
    _NUMPY_NAMES[(f"{_core}.multiarray", "_reconstruct")] = "reconstruct"
    _NUMPY_NAMES[(f"{_core}.multiarray", "scalar")] = "scalar"
    _NUMPY_NAMES[(f"{_core}.numeric", "_frombuffer")] = "frombuffer"


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return _Global(_NUMPY_NAMES.get((module, name), "refused"), f"{module}.{name}")

    def persistent_load(self, pid):  # the scan refuses persistent ids first; this is the second line
        raise pickle.UnpicklingError("persistent id")


def _read_pickle(path: Path, budget: _Budget) -> tuple[object, int]:
    ops = _scan(path, budget)
    with open(path, "rb") as f:
        try:
            return _Unpickler(f).load(), ops
        except RecursionError as e:
            raise MMSAFileError(path, None, "not a readable MMSA feature pickle (nested too deeply)") from e
        except Exception as e:  # UnpicklingError, EOFError, ValueError, TypeError, MemoryError... for damaged files
            raise MMSAFileError(path, None, f"not a readable MMSA feature pickle ({type(e).__name__}: "
                                            f"{_brief(e)})") from e


def _brief(obj, limit: int = 200) -> str:
    # Error messages never repr arbitrary file content at length (a 10^6-digit int cannot even be printed).
    try:
        s = str(obj)
    except Exception:
        return f"<{type(obj).__name__}>"
    return s if len(s) <= limit else s[:limit] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Step 3: validation and construction.

_PLAIN = re.compile(r"^([biuf])(\d+)$")
_FLEX = re.compile(r"^([US])(\d*)$")
_SIZES = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8)}


class _Builder:
    """Turns the unpickled tree of placeholders into plain Python values and validated numpy arrays."""

    def __init__(self, path: Path, budget: _Budget, max_visits: int):
        # Every element reached corresponds to one push in the opcode stream, unless a container is shared;
        # MMSA files share none, so more visits than opcodes means a shared-container expansion (billion laughs).
        self.path, self.budget, self.visits = path, budget, max_visits
        self.dtypes: dict[int, np.dtype | str] = {}
        self.built: dict[int, object] = {}

    def fail(self, key: str | None, what: str):
        return MMSAFileError(self.path, key, what)

    def value(self, obj, key: str | None, depth: int = 0):
        self.budget.take(8, key)
        self.visits -= 1
        if self.visits < 0:
            raise self.fail(key, "shared containers expand to more elements than the file has opcodes "
                                 "(a 'billion laughs' structure)")
        if depth > MAX_DEPTH:
            raise self.fail(key, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(obj, _Call):
            if id(obj) not in self.built:
                self.built[id(obj)] = self.call(obj, key)
                if obj.fn.kind != "dtype":
                    obj.args, obj.state = (), None  # frees the file's bytes once the array holds its own copy
            return self.built[id(obj)]
        if isinstance(obj, _Global):
            raise self.global_error(obj, key)
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if not isinstance(k, str):
                    raise self.fail(key, f"dict key of type {type(k).__name__}; keys must be strings")
                out[k] = self.value(v, f"{key}/{k}" if key else k, depth + 1)
            return out
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.value(v, f"{key}[{i}]", depth + 1) for i, v in enumerate(obj))
        if isinstance(obj, str):
            if len(obj) > MAX_STRING:
                raise self.fail(key, f"string of {len(obj)} characters (at most {MAX_STRING})")
            return obj
        if obj is None or isinstance(obj, (bool, int, float, bytes)):
            return obj
        if isinstance(obj, bytearray):
            return bytes(obj)
        raise self.fail(key, f"unsupported object of type {type(obj).__name__}")

    def global_error(self, g: _Global, key: str | None) -> MMSAFileError:
        if g.kind == "refused":
            return self.fail(key, f"refusing to load global '{g.name}': an MMSA feature pickle may only hold numpy "
                                  f"arrays, dicts, lists, tuples, strings and numbers (the file is untrusted input)")
        return self.fail(key, f"the numpy global '{g.name}' is not data")

    def call(self, c: _Call, key: str | None):
        kind = c.fn.kind
        if kind == "refused":
            raise self.global_error(c.fn, key)
        if kind == "reconstruct":
            return self.reconstruct(c, key)
        if kind == "frombuffer":
            if len(c.args) != 4 or c.state is not None:
                raise self.fail(key, "malformed _frombuffer call")
            buf, dt, shape, order = c.args
            return self.array(key, self.dtype(dt, key), shape, order == "F" if order in ("C", "F") else None, buf)
        if kind == "scalar":
            if len(c.args) != 2 or c.state is not None:
                raise self.fail(key, "malformed numpy scalar")
            dt = self.dtype(c.args[0], key)
            if isinstance(dt, str):
                raise self.fail(key, "refusing a numpy object scalar (it would be read from raw memory)")
            return self.array(key, dt, (), False, c.args[1])[()]
        if kind in ("encode", "bytes"):
            return self.raw_bytes(c, key)
        if kind == "dtype":
            dt = self.dtype(c, key)
            if isinstance(dt, str):
                raise self.fail(key, "a bare object dtype is not data")
            return dt
        raise self.fail(key, f"refusing a call of '{c.fn.name}': arrays are read only through numpy's pickle "
                             f"constructors (_reconstruct, _frombuffer, scalar)")

    def raw_bytes(self, obj, key: str | None) -> bytes:
        if isinstance(obj, (bytes, bytearray)):
            return obj
        if isinstance(obj, _Call) and obj.fn.kind == "bytes" and obj.args == () and obj.state is None:
            return b""  # protocol 2 spells b"" as bytes()
        if isinstance(obj, _Call) and obj.fn.kind == "encode" and obj.state is None and len(obj.args) == 2:
            text, encoding = obj.args
            # Protocol 2 spells bytes as _codecs.encode(latin-1 text, "latin1"): one byte per character, so the
            # output is never larger than the text; any other codec (hex, zlib, ...) or input is refused.
            if isinstance(text, str) and encoding in ("latin1", "latin-1"):
                self.budget.take(len(text), key)
                try:
                    return text.encode("latin1")
                except UnicodeEncodeError:
                    raise self.fail(key, "latin-1 byte string holds characters above U+00FF") from None
        raise self.fail(key, "an array's data must be a byte string (or protocol 2's _codecs.encode(text, "
                             "'latin1'))")

    def dtype(self, obj, key: str | None) -> np.dtype | str:
        """A validated plain dtype, or the string "object" for an object dtype (used only with a list of items)."""
        if not (isinstance(obj, _Call) and obj.fn.kind == "dtype"):
            raise self.fail(key, f"expected a numpy dtype, got {type(obj).__name__}")
        if id(obj) in self.dtypes:
            return self.dtypes[id(obj)]
        args, state = obj.args, obj.state
        if not (1 <= len(args) <= 3 and isinstance(args[0], str)):
            raise self.fail(key, "malformed numpy dtype")
        code = args[0]
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
            raise self.fail(key, f"dtype {_brief(code, 20)!r} has a malformed or crafted state")
        _, order, subarray, names, fields, elsize, alignment, _flags = state[:8]
        if subarray is not None or names is not None or fields is not None:
            raise self.fail(key, f"refusing structured / subarray dtype {_brief(code, 20)!r}: field offsets and "
                                 f"sub-arrays are not part of an MMSA file")
        if order not in ("<", ">", "|", "=") or not isinstance(elsize, int) or not isinstance(alignment, int):
            raise self.fail(key, f"dtype {_brief(code, 20)!r} has a malformed state")
        if len(state) == 9 and state[8] is not None:
            raise self.fail(key, f"refusing dtype {_brief(code, 20)!r} with metadata (datetime or custom dtype)")
        if code in ("O4", "O8", "O"):
            result: np.dtype | str = "object"
        elif (m := _PLAIN.match(code)) and int(m.group(2)) in _SIZES[m.group(1)] and elsize == -1:
            result = np.dtype(("|" if m.group(2) == "1" else order) + code)
        elif (m := _FLEX.match(code)) and m.group(1) == "U" and elsize >= 4 and elsize % 4 == 0:
            result = np.dtype(f"{'<' if order in '|=' else order}U{elsize // 4}")
        elif (m := _FLEX.match(code)) and m.group(1) == "S" and elsize >= 1:
            result = np.dtype(f"S{elsize}")
        else:
            raise self.fail(key, f"refusing dtype {_brief(code, 20)!r} (elsize {_brief(elsize, 20)}): only bool, "
                                 f"integer, float and non-empty fixed-width string dtypes are read")
        self.dtypes[id(obj)] = result
        return result

    def reconstruct(self, c: _Call, key: str | None) -> np.ndarray:
        if not (len(c.args) == 3 and isinstance(c.args[0], _Global) and c.args[0].kind == "ndarray"):
            raise self.fail(key, "refusing _reconstruct of anything but a plain numpy.ndarray")
        state = c.state
        if isinstance(state, tuple) and len(state) == 4:
            state = (1, *state)  # numpy's version-0 state has no version field
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise self.fail(key, "malformed numpy array state")
        _, shape, dt, fortran, data = state
        if not isinstance(fortran, bool):
            raise self.fail(key, "malformed numpy array state (order flag)")
        return self.array(key, self.dtype(dt, key), shape, fortran, data)

    def array(self, key: str | None, dt: np.dtype | str, shape, fortran: bool | None, data) -> np.ndarray:
        if fortran is None:
            raise self.fail(key, "array order must be 'C' or 'F'")
        if (not isinstance(shape, tuple) or len(shape) > _MAX_NDIM
                or not all(type(s) is int and 0 <= s <= _MAX_DIM for s in shape)):
            raise self.fail(key, f"array shape must be a tuple of at most {_MAX_NDIM} sizes in [0, 2^40]")
        count = 1
        for s in shape:
            count *= s
        order = "F" if fortran else "C"
        if isinstance(dt, str):
            return self.object_array(key, shape, count, order, data)
        raw = self.raw_bytes(data, key)
        if len(raw) != count * dt.itemsize:
            raise self.fail(key, f"array data has {len(raw)} bytes, shape {shape} of {dt} needs "
                                 f"{count * dt.itemsize}")
        self.budget.take(len(raw), key)
        a = np.frombuffer(raw, dtype=dt, count=count).reshape(shape, order=order).copy(order="K")
        if dt.kind == "U" and a.size and int(a.view(np.uint32).max()) > 0x10FFFF:
            raise self.fail(key, "unicode array holds code points above U+10FFFF")
        return a

    def object_array(self, key: str | None, shape, count: int, order: str, items) -> np.ndarray:
        # numpy pickles an object array's items as a list; only strings, bytes and numbers are turned into a
        # plain array, so no object array is ever built from the file.
        if not isinstance(items, list):
            raise self.fail(key, "refusing an object array stored as raw bytes (only a list of items is read)")
        if len(items) != count:
            raise self.fail(key, f"object array of shape {shape} holds {len(items)} items")
        self.budget.take(8 * count, key)
        if all(type(s) is str for s in items):
            width = max(map(len, items), default=0)
            if width > MAX_STRING:
                raise self.fail(key, f"string of {width} characters (at most {MAX_STRING})")
            self.budget.take(4 * max(width, 1) * count, key)
            dt = np.dtype(f"<U{max(width, 1)}")
        elif all(type(s) is bytes for s in items):
            width = max(map(len, items), default=0)
            self.budget.take(max(width, 1) * count, key)
            dt = np.dtype(f"S{max(width, 1)}")
        elif all(type(s) in (int, float) for s in items):
            self.budget.take(8 * count, key)
            dt = np.dtype(np.float64)
            if not all(type(s) is float or -2 ** 63 <= s < 2 ** 63 for s in items):
                raise self.fail(key, "object array holds an integer beyond 64 bits")
        else:
            kinds = sorted({type(s).__name__ for s in items})[:4]
            raise self.fail(key, f"object array items must all be str, all bytes or all numbers, got {kinds}")
        return np.array(items, dtype=dt).reshape(shape, order=order)


# ---------------------------------------------------------------------------------------------------------------
# npz

def _read_npz(path: Path, budget: _Budget) -> dict:
    data: dict[str, dict] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                entry = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                split, sep, key = entry.partition("/")
                if not sep or not key:
                    raise MMSAFileError(path, None, f"npz entry {_brief(entry, 80)!r} is not named '<split>/<key>' "
                                                    f"(e.g. 'train/text')")
                if key in data.get(split, {}):
                    raise MMSAFileError(path, entry, "npz entry appears twice")
                data.setdefault(split, {})[key] = _read_npy(path, entry, zf, info, budget)
    except MMSAFileError:
        raise
    except Exception as e:  # BadZipFile, zlib.error, EOFError, NotImplementedError (encryption), OSError, ...
        raise MMSAFileError(path, None, f"not a readable npz ({type(e).__name__}: {_brief(e)})") from e
    return data


def _read_npy(path: Path, entry: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget) -> np.ndarray:
    fmt = np.lib.format
    with zf.open(info) as f:
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dt = fmt.read_array_header_1_0(f, max_header_size=_MAX_NPY_HEADER)
            elif version == (2, 0):
                shape, fortran, dt = fmt.read_array_header_2_0(f, max_header_size=_MAX_NPY_HEADER)
            else:
                raise ValueError(f"npy format version {version} (only 1.0 and 2.0 are read)")
        except Exception as e:  # ValueError for bad magic / header, RecursionError / SyntaxError from the header text
            raise MMSAFileError(path, entry, f"not a readable .npy member ({type(e).__name__}: {_brief(e)})") from e
        if (dt.fields is not None or dt.subdtype is not None or dt.hasobject or dt.itemsize == 0
                or dt.kind not in "biufUS" or (dt.kind in "biuf" and dt.itemsize not in _SIZES[dt.kind])):
            raise MMSAFileError(path, entry, f"refusing dtype {_brief(dt, 40)}: only bool, integer, float and "
                                             f"non-empty fixed-width string dtypes are read")
        if len(shape) > _MAX_NDIM or not all(0 <= s <= _MAX_DIM for s in shape):
            raise MMSAFileError(path, entry, f"array shape {_brief(shape, 60)} out of range")
        count = 1
        for s in shape:
            count *= s
        nbytes = count * dt.itemsize
        if info.file_size - f.tell() != nbytes:
            raise MMSAFileError(path, entry, f"member holds {info.file_size - f.tell()} data bytes, shape {shape} "
                                             f"of {dt} needs {nbytes}")
        budget.take(nbytes, entry)
        buf = bytearray(nbytes)
        view, got = memoryview(buf), 0
        while got < nbytes:
            k = f.readinto(view[got:])
            if not k:
                raise MMSAFileError(path, entry, f"member is truncated ({got} of {nbytes} data bytes)")
            got += k
    a = np.frombuffer(buf, dtype=dt, count=count).reshape(shape, order="F" if fortran else "C")
    if dt.kind == "U" and a.size and int(a.view(np.uint32).max()) > 0x10FFFF:
        raise MMSAFileError(path, entry, "unicode array holds code points above U+10FFFF")
    return a


# ---------------------------------------------------------------------------------------------------------------
# Layout checks.

def _finite_count(a: np.ndarray) -> int:
    # Chunks of ~16 MiB: np.isfinite over a whole MOSEI text array would allocate a 0.9 GB mask.
    step = max(1, (16 << 20) // max(1, a[:1].nbytes))
    bad = 0
    for i in range(0, a.shape[0], step):
        chunk = a[i:i + step]
        fin = np.isfinite(chunk)
        if not fin.all():
            bad += int(fin.size - np.count_nonzero(fin))
    return bad


def _strings(path: Path, where: str, s, budget: _Budget) -> np.ndarray:
    if isinstance(s, np.ndarray) and s.dtype.kind == "S":
        try:
            return np.char.decode(s, "utf-8")
        except UnicodeDecodeError:
            raise MMSAFileError(path, where, "byte strings are not UTF-8") from None
    if isinstance(s, list) and all(type(v) is str for v in s):
        width = max(map(len, s), default=1) or 1
        budget.take(4 * width * len(s), where)
        return np.array(s, dtype=f"<U{width}")
    if not (isinstance(s, np.ndarray) and s.dtype.kind == "U"):
        raise MMSAFileError(path, where, f"must be a 1-D sequence of strings, got "
                                         f"{getattr(s, 'dtype', type(s).__name__)}")
    return s


def _check_split(path: Path, split: str, d: object, nonfinite: str, budget: _Budget) -> dict[str, np.ndarray]:
    if not isinstance(d, dict):
        raise MMSAFileError(path, split, f"must be a dict of arrays, got {type(d).__name__}")
    for key in REQUIRED_KEYS:
        if key not in d:
            raise MMSAFileError(path, split, f"has no key {key!r} (keys present: {sorted(d)[:20]})")
    out = dict(d)  # extra keys (text_bert, annotations, ...) pass through (already validated values)

    n_of: dict[str, int] = {}
    for key in MODALITIES:
        where, a = f"{split}/{key}", d[key]
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu":
            raise MMSAFileError(path, where, f"must be a numeric numpy array, got "
                                             f"{getattr(a, 'dtype', type(a).__name__)}")
        if a.ndim != 3:
            raise MMSAFileError(path, where, f"must have shape (N, T, D), got {a.shape}")
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            budget.take(4 * a.size, where)
            a = np.ascontiguousarray(a, dtype=np.float32)
        count = _finite_count(a)
        if count:
            if nonfinite == "raise":
                raise MMSAFileError(path, where, f"has {count} non-finite value(s) (NaN/Inf); pass nonfinite='zero' "
                                                 f"to load_mmsa to replace them with 0")
            np.copyto(a, np.float32(0), where=~np.isfinite(a))
            warnings.warn(f"{path}: {where}: replaced {count} non-finite value(s) (NaN/Inf) with 0", stacklevel=4)
        out[key] = a
        n_of[key] = a.shape[0]

    where = f"{split}/regression_labels"
    labels = d["regression_labels"]
    if not (isinstance(labels, np.ndarray) and labels.dtype.kind in "fiu"
            and (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1))):
        raise MMSAFileError(path, where, f"must be a numeric (N,) array, got "
                                         f"{getattr(labels, 'dtype', type(labels).__name__)} "
                                         f"shape {getattr(labels, 'shape', None)}")
    labels = labels.reshape(-1).astype(np.float32)
    lo, hi = LABEL_RANGE
    bad = ~(np.isfinite(labels) & (labels >= lo) & (labels <= hi))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise MMSAFileError(path, where, f"has {int(bad.sum())} value(s) outside [{lo:g}, {hi:g}] or non-finite "
                                         f"(first: index {first}, value {float(labels[first])!r})")
    out["regression_labels"] = labels
    n_of["regression_labels"] = labels.shape[0]

    for key in ("id", "raw_text"):
        s = _strings(path, f"{split}/{key}", d[key], budget)
        if s.ndim != 1:
            raise MMSAFileError(path, f"{split}/{key}", f"must be a 1-D sequence of strings, got shape {s.shape}")
        out[key] = s
        n_of[key] = s.shape[0]

    # Sequence lengths come from the file (unaligned) or, when absent, from the arrays themselves (aligned).
    for m in MODALITIES:
        key, t = f"{m}_lengths", out[m].shape[1]
        where = f"{split}/{key}"
        if key in d:
            ln = d[key]
            if (not isinstance(ln, np.ndarray) or ln.ndim != 1 or ln.dtype.kind not in "iuf"
                    or (ln.dtype.kind == "f" and not np.all(ln == np.round(ln)))):
                raise MMSAFileError(path, where, f"must be a 1-D array of integers, got "
                                                 f"{getattr(ln, 'dtype', type(ln).__name__)} "
                                                 f"shape {getattr(ln, 'shape', None)}")
            if ln.size and (ln.min() < 0 or ln.max() > t):
                raise MMSAFileError(path, where, f"must lie in [0, {t}] (the {m} array's T), got min {ln.min()} "
                                                 f"max {ln.max()}")
            ln = ln.astype(np.int64)
            n_of[key] = ln.shape[0]
        else:
            ln = np.full(out[m].shape[0], t, dtype=np.int64)
        out[key] = ln

    if len(set(n_of.values())) > 1:
        raise MMSAFileError(path, split, "arrays disagree on the number of samples N: "
                            + ", ".join(f"{k} {v}" for k, v in n_of.items()))
    return out


def load_mmsa(path: str | os.PathLike, *, nonfinite: str = "raise") -> dict[str, dict[str, np.ndarray]]:
    """Read an MMSA feature file (pickle or npz; see the module docstring) safely and validate it.

    Args:
        path: ``aligned_50.pkl`` / ``unaligned_50.pkl`` (pickle protocols 0-5, written by numpy 1 or 2) or an
            ``.npz`` with the same content.
        nonfinite: ``"raise"`` (default) rejects NaN/Inf features; ``"zero"`` replaces them with 0 and warns once per
            key (MMSA's own loader zeroes the ``-inf`` entries of the released audio features).

    Returns:
        ``{split: {key: array}}`` for the splits ``train``, ``valid``, ``test``, each with

        - ``text``, ``audio``, ``vision``: float32 (N, T_m, D_m), C-contiguous, writable;
        - ``regression_labels``: float32 (N,) in [-3, 3];
        - ``id``, ``raw_text``: numpy unicode arrays (N,);
        - ``text_lengths``, ``audio_lengths``, ``vision_lengths``: int64 (N,), from the file when it has them
          (unaligned), otherwise T_m for every sample;
        - any other key of the file, as validated plain values / arrays (object arrays of strings become unicode
          arrays).

    Memory: at most 4 x the file size + 64 MiB decoded (module docstring); peak use for an honest file is about
    twice its size (the file's bytes while unpickling, then the arrays).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MMSAFileError: (a ``ValueError`` and ``pickle.UnpicklingError``) anything wrong with the content: a global
            other than numpy's array/dtype/scalar constructors, a hostile or damaged stream, the memory budget, an
            unsupported dtype, a missing split or key, a malformed array, N that differs between a split's arrays,
            feature dims that differ between splits, NaN/Inf features (with ``nonfinite="raise"``), labels outside
            [-3, 3]. The message names the file and the ``split/key``; ``.path`` and ``.key`` hold them.
    """
    if nonfinite not in ("raise", "zero"):
        raise ValueError(f"load_mmsa: nonfinite must be 'raise' or 'zero', got {nonfinite!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_mmsa: no MMSA feature file at {path}")
    budget = _Budget(path, path.stat().st_size)
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04" or zipfile.is_zipfile(path)  # a truncated zip has no directory
    try:
        if is_zip:
            raw = _read_npz(path, budget)
        else:
            tree, ops = _read_pickle(path, budget)
            raw = _Builder(path, budget, ops + 64).value(tree, None)
            del tree
        if not isinstance(raw, dict):
            raise MMSAFileError(path, None, f"expected a dict of splits {SPLITS}, got {type(raw).__name__}")
        for split in SPLITS:
            if split not in raw:
                raise MMSAFileError(path, None, f"missing split {split!r} (splits present: {sorted(raw)[:20]})")
        data = {split: _check_split(path, split, raw.pop(split), nonfinite, budget) for split in SPLITS}
    except MemoryError as e:  # the budget keeps honest-looking files within 4x; the machine may still have less
        raise MMSAFileError(path, None, "out of memory while decoding (the file is larger than the memory "
                                        "available)") from e
    except RecursionError as e:
        raise MMSAFileError(path, None, "nested too deeply") from e
    for m in MODALITIES:
        dims = {split: data[split][m].shape[2] for split in SPLITS}
        if len(set(dims.values())) > 1:
            raise MMSAFileError(path, m, f"feature size D differs between splits: {dims}")
    return data
