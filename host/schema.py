"""The compiled model's device nodes as typed records: what the compiler builds, a saved file's
JSON attributes (:meth:`QGemm.attrs`), what :func:`sparsa.host.graph.load` checks
(:meth:`QGemm.parse`) and what the runtime reads (``node.spec``).

A record's fields are its attributes; a field's ``doc`` says what it holds and is quoted by
the error for a value that is not that. Constants (weights, multipliers, scales) are named by
the record and held by the model.
"""

from dataclasses import MISSING, dataclass, field, fields

import numpy as np

from .errors import ModelError


def is_int(value, low=None, high=None):
    """``value`` is an int (not a bool) within ``low..high``."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and (low is None or value >= low) and (high is None or value <= high))


WINDOW = {"kernel_shape": (2, 1), "strides": (2, 1), "dilations": (2, 1), "pads": (4, 0)}
"""A window's attributes (a convolution's, a pooling's): how many ints each holds, the least."""


def bad_window(attrs, keys=tuple(WINDOW)):
    """The first of ``keys`` in ``attrs`` that is not its count of ints of at least its least
    (:data:`WINDOW`), or None."""
    for key in keys:
        count, low = WINDOW[key]
        values = attrs.get(key)
        if not (isinstance(values, (list, tuple)) and len(values) == count
                and all(is_int(v, low) for v in values)):
            return key
    return None


def _attr(doc, default=None):
    return field(default=default, metadata={"doc": doc})


def _required(doc):
    return field(metadata={"doc": doc})


class _Record:
    """What both records share: the JSON form, parsing from it, the error naming a field."""

    CONSTANTS = ()
    """The attributes that name constants."""

    @classmethod
    def docs(cls):
        """Each attribute's name and what it holds."""
        return {f.name: f.metadata["doc"] for f in fields(cls)}

    def attrs(self):
        """The JSON attributes a saved file holds: every field set (a False flag and an
        absent value left out)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value is False:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def parse(cls, attrs, constants, where):
        """The record of a node's JSON ``attrs``, checked against ``constants`` (the model's);
        :class:`ModelError` naming ``where`` and the attribute otherwise."""
        docs = cls.docs()
        unknown = sorted(set(attrs) - set(docs))
        if unknown:
            raise ModelError(f"{where}: attribute {unknown[0]!r}: not a {cls.__name__} "
                             f"attribute (expected one of {', '.join(docs)})")
        missing = [f.name for f in fields(cls) if f.name not in attrs
                   and f.default is MISSING]
        if missing:
            cls._bad(where, missing[0], "absent")
        record = cls(**{key: tuple(value) if isinstance(value, list) else value
                        for key, value in attrs.items()})
        record.check(constants, where)
        return record

    @classmethod
    def _bad(cls, where, name, got):
        raise ModelError(f"{where}: attribute {name!r}: expected "
                         f"{cls.docs().get(name, 'no such attribute')}, got {got}")


QGEMM_MODES = ("device", "host", "float", "int32")
"""Where a QGemm's int32 sums go: requantized to int8 on the device; requantized on the host
(a multiplier the device cannot take); scaled to float32; left int32."""


@dataclass(frozen=True)
class QGemm(_Record):
    """A GEMM or convolution by constant int8 weights on the device: ``groups`` products of
    ``(rows, k) x (k, n / groups)``, the input's zero point folded into the bias, the output
    as ``mode`` says."""

    groups: int = _required("int >= 1")
    k: int = _required("int >= 1")
    n: int = _required("int >= 1, a multiple of groups")
    mode: str = _required(" | ".join(QGEMM_MODES))
    weight: str = _required("constant: int8 (groups, k, n / groups)")
    colsum: str = _required("constant: n integers")
    bias: str = _required("constant: n int32")
    source_op: str = _attr("the ONNX op it came from", "QGemm")
    x_zero: int = _attr("the input's zero point, -128..127", 0)
    conv: dict = _attr("kernel_shape, strides, dilations (2 ints >= 1), pads (4 ints >= 0)")
    multiplier: str = _attr("constant (device): 1 or n int32")
    shift: int = _attr("(device) 0..31")
    out_zero: int = _attr("(device, host) -128..127")
    scale: str = _attr("constant (host, float): 1 or n finite numbers, > 0 on the host")
    relu: bool = _attr("true or false", False)
    clip: tuple = _attr("[low, high] (device, host)")

    CONSTANTS = ("weight", "colsum", "bias", "multiplier", "scale")

    def check(self, constants, where):
        """:class:`ModelError` naming ``where`` and the attribute for a field that is not what
        its ``doc`` says (types, ranges, constants' dtypes and shapes, the mode's own)."""
        bad = lambda name, got: self._bad(where, name, got)  # noqa: E731
        for name in ("groups", "k", "n"):
            if not is_int(getattr(self, name), 1):
                bad(name, repr(getattr(self, name)))
        groups, k, n, mode = self.groups, self.k, self.n, self.mode
        if n % groups:
            bad("n", f"{n} with {groups} groups")
        if not isinstance(self.source_op, str):
            bad("source_op", repr(self.source_op))
        if not is_int(self.x_zero, -128, 127):
            bad("x_zero", repr(self.x_zero))
        if mode not in QGEMM_MODES:
            bad("mode", repr(mode))
        if not isinstance(self.relu, bool):
            bad("relu", repr(self.relu))
        conv = self.conv
        if conv is not None:
            if not isinstance(conv, dict) or set(conv) != set(WINDOW) or bad_window(conv) \
                    or k % (conv["kernel_shape"][0] * conv["kernel_shape"][1]):
                bad("conv", repr(conv))

        def constant(name, kinds, shapes):
            key = getattr(self, name)
            if not isinstance(key, str) or key not in constants:
                bad(name, f"{key!r}, not one of the model's constants")
            value = constants[key]
            if value.dtype.kind not in kinds or value.shape not in shapes:
                bad(name, f"{value.dtype} {value.shape}")
            return value

        if constant("weight", "i", [(groups, k, n // groups)]).dtype != np.int8:
            bad("weight", str(constants[self.weight].dtype))
        constant("colsum", "iu", [(n,)])
        bias = constant("bias", "iu", [(n,)])
        if bias.size and (bias.min() < -2**31 or bias.max() > 2**31 - 1):
            bad("bias", f"values {bias.min()}..{bias.max()}")
        requantized = mode in ("device", "host")
        for name, used in (("multiplier", mode == "device"), ("shift", mode == "device"),
                           ("out_zero", requantized), ("clip", requantized),
                           ("scale", mode in ("host", "float"))):
            if not used and getattr(self, name) is not None:
                bad(name, f"{getattr(self, name)!r} in the {mode} mode")
        if requantized:
            if not is_int(self.out_zero, -128, 127):
                bad("out_zero", repr(self.out_zero))
            clip = self.clip
            if clip is not None and not (isinstance(clip, tuple) and len(clip) == 2 and all(
                    is_int(v, -128, 127) for v in clip)):
                bad("clip", repr(clip))
        if mode == "device":
            mult = constant("multiplier", "iu", [(1,), (n,)])
            if mult.min() < -2**31 or mult.max() > 2**31 - 1:
                bad("multiplier", f"values {mult.min()}..{mult.max()}")
            if not is_int(self.shift, 0, 31):
                bad("shift", repr(self.shift))
        if mode in ("host", "float"):
            scale = constant("scale", "f", [(1,), (n,)])
            if not np.all(np.isfinite(scale)) or (mode == "host" and not np.all(scale > 0)):
                bad("scale", f"values {scale.min()}..{scale.max()}")


@dataclass(frozen=True)
class QMatMul(_Record):
    """A MatMul of two int8 activations: their products on the device, the zero points'
    terms and the requantization to int8 on the host."""

    a_zero: int = _required("an int in -128..127")
    b_zero: int = _required("an int in -128..127")
    out_zero: int = _required("an int in -128..127")
    multiplier: int = _required("an int in 1..2147483647")
    shift: int = _required("an int in 0..31")
    source_op: str = _attr("the ONNX op it came from", "MatMul")

    def check(self, constants, where):
        for name, (low, high) in {"a_zero": (-128, 127), "b_zero": (-128, 127),
                                  "out_zero": (-128, 127), "multiplier": (1, 2**31 - 1),
                                  "shift": (0, 31)}.items():
            if not is_int(getattr(self, name), low, high):
                self._bad(where, name, repr(getattr(self, name)))
        if not isinstance(self.source_op, str):
            self._bad(where, "source_op", repr(self.source_op))


RECORDS = {"QGemm": QGemm, "QMatMul": QMatMul}
"""The device nodes' ops and their records."""
