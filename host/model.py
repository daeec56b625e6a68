"""INT8 inference of small networks on the accelerator, with no deep-learning framework.

Describe a float network as a list of layers (:class:`Linear`, :class:`Conv2d`,
:class:`Flatten`; ReLU is a flag of the layer it follows), calibrate and quantize it with
:func:`quantize_model`, and run the int8 network with :meth:`QuantizedModel.run` on any
accelerator from ``sparsa.open``::

    qmodel = quantize_model(layers, calibration_inputs)
    with sparsa.open("reference") as acc:
        logits = qmodel.run(acc, inputs)          # float logits
    qmodel.counters                               # cycles, MACs, MACs skipped, ... per layer

Quantization (post-training, static):

- **weights** symmetric per output channel (zero point 0, -127..127);
- **activations** symmetric per tensor with zero point 0, the scale from the largest magnitude
  the float network produces on the calibration inputs. Zero point 0 keeps a real zero an int8
  zero, which is what sparse-skip skips (ReLU outputs cost no MACs); a non-negative activation
  then uses 0..127 (7 bits);
- **bias** int32 at the accumulator's scale ``input_scale * weight_scale[j]``;
- every layer but the last requantizes its int32 sums to the next layer's int8 input on the
  device (bias, requantization and ReLU are the device's post-processing); the last returns
  int32 sums (+ bias), which :meth:`QuantizedModel.run` scales to float logits.

Conv2d runs as one GEMM through im2col: ``A`` holds one row per output pixel (the ``C x KH x KW``
patch, zero padded), ``B`` the weights as ``(C*KH*KW, out_channels)``.
"""

from dataclasses import dataclass, field

import numpy as np

from .graph import im2col
from .quant import activation_scale, quantize_weights, rounding_multiplier, weight_scales
from .validate import check_float_array, check_int8_array

# ---- the float network ----------------------------------------------------------------------

class _GemmLayer:
    """What Linear and Conv2d share: one GEMM ``A @ weight_matrix() + bias`` per batch, with
    ``A`` from :meth:`gemm_operands` and the result rows shaped back by :meth:`output`."""

    def _check_weight(self, ndim, layout):
        self.weight = check_float_array(np.asarray(self.weight, np.float64), "weight")
        if self.weight.ndim != ndim:
            raise ValueError(f"weight: expected a {ndim}-d {layout} array, got shape "
                             f"{self.weight.shape}")
        self.bias = _check_bias(self.bias, self.weight.shape[0])

    @property
    def out_channels(self):
        return self.weight.shape[0]

    def forward(self, x):
        a, shape = self.gemm_operands(x)
        y = self.output(a @ self.weight_matrix() + self.bias, shape)
        return np.maximum(y, 0) if self.relu else y


@dataclass
class Linear(_GemmLayer):
    """``y = x @ weight.T + bias`` (weight: out x in, as PyTorch stores it), then ReLU if set."""

    weight: np.ndarray
    bias: np.ndarray = None
    relu: bool = False

    def __post_init__(self):
        self._check_weight(2, "(out_features, in_features)")

    def check_input(self, x, name):
        if x.ndim != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"{name}: expected shape (batch, {self.weight.shape[1]}) for a "
                             f"Linear layer of {self.weight.shape[1]} inputs, got {x.shape}")

    def gemm_operands(self, x):
        """``(A, None)``: the batch is A."""
        return x, None

    def weight_matrix(self):
        return self.weight.T  # (in, out)

    def output(self, y, shape):
        return y


@dataclass
class Conv2d(_GemmLayer):
    """2-d convolution of NCHW inputs (weight: out_channels x in_channels x KH x KW), with
    ``stride`` and zero ``padding``, then ReLU if set."""

    weight: np.ndarray
    bias: np.ndarray = None
    stride: int = 1
    padding: int = 0
    relu: bool = False

    def __post_init__(self):
        self._check_weight(4, "(out_channels, in_channels, KH, KW)")
        for name in ("stride", "padding"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
                    value < (1 if name == "stride" else 0):
                raise ValueError(f"{name}: expected an integer >= {1 if name == 'stride' else 0}, "
                                 f"got {value!r}")

    def check_input(self, x, name):
        _, channels, kh, kw = self.weight.shape
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{name}: expected shape (batch, {channels}, H, W) for a Conv2d of "
                             f"{channels} input channels, got {x.shape}")
        if x.shape[2] + 2 * self.padding < kh or x.shape[3] + 2 * self.padding < kw:
            raise ValueError(f"{name}: expected H, W of at least the {kh}x{kw} kernel (padding "
                             f"{self.padding}), got {x.shape[2]}x{x.shape[3]}")

    def gemm_operands(self, x):
        """im2col: ``(A, (batch, OH, OW))`` with one row of ``A`` per output pixel."""
        p, s = self.padding, self.stride
        return im2col(x, self.weight.shape[2:], (s, s), (p, p, p, p), (1, 1), 0)

    def weight_matrix(self):
        return self.weight.reshape(self.weight.shape[0], -1).T  # (C*KH*KW, out)

    def output(self, y, shape):
        """GEMM rows (one per output pixel) back to NCHW."""
        batch, oh, ow = shape
        return np.ascontiguousarray(y.reshape(batch, oh, ow, -1).transpose(0, 3, 1, 2))


@dataclass
class Flatten:
    """``(batch, ...)`` to ``(batch, features)``, in C order (as ``torch.flatten(x, 1)``)."""

    relu = False

    def check_input(self, x, name):
        if x.ndim < 2:
            raise ValueError(f"{name}: expected a batch (at least 2-d), got shape {x.shape}")

    def forward(self, x):
        return x.reshape(x.shape[0], -1)


def _check_bias(bias, channels):
    if bias is None:
        return np.zeros(channels)
    bias = check_float_array(np.asarray(bias, np.float64), "bias")
    if bias.shape != (channels,):
        raise ValueError(f"bias: expected shape ({channels},), got {bias.shape}")
    return bias


def _check_layers(layers):
    layers = list(layers)
    if not layers:
        raise ValueError("layers: expected at least one layer, got none")
    for index, layer in enumerate(layers):
        if not isinstance(layer, (Linear, Conv2d, Flatten)):
            raise TypeError(f"layers[{index}]: expected a Linear, Conv2d or Flatten, got "
                            f"{type(layer).__name__}")
    if isinstance(layers[-1], Flatten):
        raise ValueError("layers: expected a Linear or Conv2d last, got Flatten")
    return layers


def forward_float(layers, x):
    """The float network's output for ``x`` (float64)."""
    x = np.asarray(x, np.float64)
    for layer in _check_layers(layers):
        layer.check_input(x, "x")
        x = layer.forward(x)
    return x


# ---- quantization ---------------------------------------------------------------------------

@dataclass
class QuantizedLayer:
    """One layer of the int8 network: ``out = device(A @ weight + bias, requant, relu)``."""

    layer: object  # the float layer (shapes, im2col)
    input_scale: float
    weight: np.ndarray  # int8 (K, out_channels): the GEMM's B
    weight_scale: np.ndarray  # float64 (out_channels,)
    bias: np.ndarray  # int32 (out_channels,)
    requant: tuple = None  # (multiplier(s), shift(s), 0); None for the last layer (int32 out)
    output_scale: float = None  # the scale of the int8 output (None: int32 accumulators)


@dataclass
class QuantizedModel:
    """An int8 network for the accelerator; see the module docstring."""

    layers: list  # QuantizedLayer or Flatten
    input_scale: float
    counters: list = field(default_factory=list)  # per GEMM layer, after run()

    def quantize_input(self, x):
        """Float inputs to the first layer's int8 (zero point 0)."""
        x = _as_float(x, "x")
        return np.clip(np.round(x / self.input_scale), -127, 127).astype(np.int8)

    def run_int(self, accelerator, x, sparse_skip=True):
        """The last layer's int32 sums (+ bias) for int8 input ``x``; the accelerator's
        counters for each GEMM layer go to :attr:`counters` (summed over calls since the last
        :meth:`reset_counters`)."""
        x = check_int8_array(x, "x")
        if not self.counters:
            self.reset_counters()
        gemm_index = 0
        for q in self.layers:
            if isinstance(q, Flatten):
                q.check_input(x, "x")
                x = q.forward(x)
                continue
            q.layer.check_input(x, "x")
            a, shape = q.layer.gemm_operands(x)
            with accelerator.lock:  # this call's counters, not another thread's
                y = accelerator.matmul(a, q.weight, bias=q.bias, requant=q.requant,
                                       relu=q.layer.relu, sparse_skip=sparse_skip)
                counts = accelerator.last_counters
            total = self.counters[gemm_index]
            for key, value in counts.items():
                if key != "estimated":
                    total[key] += value
            total["estimated"] = bool(counts.get("estimated"))
            total["products"] += a.shape[0] * a.shape[1] * q.weight.shape[1]
            # Products whose activation is zero (whatever the weight): what ReLU zeros save.
            total["zero_activation_products"] += int(np.count_nonzero(a == 0)) * q.weight.shape[1]
            x = q.layer.output(y, shape)
            gemm_index += 1
        return x

    def run(self, accelerator, x, sparse_skip=True):
        """Float logits for float inputs ``x``: quantize, run on ``accelerator``, scale the last
        layer's int32 sums by ``input_scale * weight_scale``."""
        acc = self.run_int(accelerator, self.quantize_input(x), sparse_skip)
        return self.dequantize_output(acc)

    def dequantize_output(self, acc):
        last = self.gemm_layers[-1]
        scale = last.input_scale * last.weight_scale
        if acc.ndim == 4:  # NCHW
            scale = scale[None, :, None, None]
        return acc.astype(np.float64) * scale

    @property
    def gemm_layers(self):
        return [q for q in self.layers if isinstance(q, QuantizedLayer)]

    def reset_counters(self):
        self.counters = [
            {"cycles": 0, "macs": 0, "macs_skipped": 0, "stall_in": 0, "stall_out": 0,
             "ksteps_skipped": 0, "jobs": 0, "products": 0, "zero_activation_products": 0,
             "estimated": False}
            for _ in self.gemm_layers]

    def total_counters(self):
        """:attr:`counters` summed over the layers."""
        total = {key: sum(c[key] for c in self.counters)
                 for key in self.counters[0] if key != "estimated"}
        total["estimated"] = any(c["estimated"] for c in self.counters)
        return total


def _as_float(values, name):
    """Float inputs (integers, e.g. pixel values, are taken as floats)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iub":
        values = values.astype(np.float64)
    return check_float_array(values, name)


def quantize_model(layers, calibration):
    """Quantize a float network (see the module docstring), calibrating the activation scales
    on ``calibration`` (float inputs, a batch)."""
    layers = _check_layers(layers)
    x = _as_float(calibration, "calibration")
    input_scale = activation_scale(x)
    scale = input_scale
    gemm_positions = [i for i, layer in enumerate(layers) if not isinstance(layer, Flatten)]
    quantized = []
    for index, layer in enumerate(layers):
        layer.check_input(x, "calibration")
        x = layer.forward(x)
        if isinstance(layer, Flatten):
            quantized.append(layer)
            continue
        w = layer.weight_matrix()  # (K, out)
        w_scale = weight_scales(w, 1, layer.bias, scale)
        w_q = quantize_weights(w, w_scale, 1)
        acc_scale = scale * w_scale
        bias = np.round(layer.bias / acc_scale).astype(np.int32)
        q = QuantizedLayer(layer, scale, np.ascontiguousarray(w_q), w_scale, bias)
        if index != gemm_positions[-1]:
            out_scale = activation_scale(x)
            # The device only scales down (multiplier < 1); a layer that shrinks its range
            # more than that gets a coarser output scale.
            out_scale = max(out_scale, float(np.max(acc_scale)) * (1 + 2**-20))
            multiplier, shift = rounding_multiplier(acc_scale / out_scale)
            q.requant, q.output_scale = (multiplier, shift, 0), out_scale
            scale = out_scale
        quantized.append(q)
    return QuantizedModel(quantized, input_scale)
