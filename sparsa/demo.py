"""The main demo: an INT8 MLP for scikit-learn's digits, run on the simulated accelerator.

A float MLP (64 -> 64 -> 32 -> 10, ReLU) is fitted on the training split of the 8x8 digit images
bundled with scikit-learn (no download), quantized with :func:`sparsa.host.model.quantize_model`
and run on the test split twice: on the reference backend and on the simulated RTL, whose
logits must be identical.
"""

import time
import warnings

import numpy as np

from sparsa.host import model


def digits_mlp(hidden=(64, 32), seed=0):
    """``(layers, (x_train, y_train), (x_test, y_test))``: a float MLP fitted on digits (pixels
    scaled to 0..1) as a list of :class:`~sparsa.host.model.Linear` layers."""
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, random_state=seed,
        stratify=digits.target)
    classifier = MLPClassifier(hidden_layer_sizes=tuple(hidden), max_iter=400, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x_train, y_train)
    last = len(classifier.coefs_) - 1
    layers = [model.Linear(w.T, b, relu=index < last)
              for index, (w, b) in enumerate(zip(classifier.coefs_, classifier.intercepts_))]
    return layers, (x_train, y_train), (x_test, y_test)


def _run(qmodel, accelerator, x, batch, progress=None, sparse_skip=True):
    qmodel.reset_counters()
    out = []
    for start in range(0, len(x), batch):
        out.append(qmodel.run_int(accelerator, qmodel.quantize_input(x[start:start + batch]),
                                  sparse_skip))
        if progress is not None:
            progress.update(min(batch, len(x) - start))
    return np.concatenate(out), qmodel.total_counters(), [dict(c) for c in qmodel.counters]


def run(config, simulator="verilator", batch=50, clock_mhz=100.0, hidden=(64, 32), seed=0,
        printer=print):
    """Run the demo, printing as it goes; returns a dict of the figures (and 0/1 in "status")."""
    import sparsa

    started = time.perf_counter()
    layers, (x_train, y_train), (x_test, y_test) = digits_mlp(hidden, seed)
    sizes = [layers[0].weight.shape[1]] + [layer.out_channels for layer in layers]
    float_logits = model.forward_float(layers, x_test)
    float_accuracy = float(np.mean(float_logits.argmax(1) == y_test))
    printer(f"sparsa demo: an INT8 MLP ({' -> '.join(map(str, sizes))}, ReLU) on scikit-learn's "
            f"digits, on the simulated accelerator")
    printer(f"  float MLP fitted on {len(x_train)} training images in "
            f"{time.perf_counter() - started:.1f} s; test accuracy {100 * float_accuracy:.2f}% "
            f"({len(x_test)} test images)")

    qmodel = model.quantize_model(layers, x_train)
    printer(f"  quantized: int8 weights per output channel, int8 activations per tensor "
            f"(scales calibrated on the training images), int32 bias; {len(layers) - 1} "
            f"requantizations between layers on the device")

    with sparsa.open("reference", **config) as reference:
        started = time.perf_counter()
        ref_acc, _, _ = _run(qmodel, reference, x_test, batch)
        ref_seconds = time.perf_counter() - started
        dense_cycles = _run(qmodel, reference, x_test, batch, sparse_skip=False)[1]["cycles"]
    ref_accuracy = float(np.mean(ref_acc.argmax(1) == y_test))
    printer(f"  reference backend (NumPy): int8 test accuracy {100 * ref_accuracy:.2f}% "
            f"({100 * (ref_accuracy - float_accuracy):+.2f} points) in {1e3 * ref_seconds:.0f} ms")

    started = time.perf_counter()
    with sparsa.open("sim", simulator=simulator, **config) as device:
        printer(f"  {device!r}: built and started in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        with _progress(len(x_test)) as bar:
            sim_acc, total, per_layer = _run(qmodel, device, x_test, batch, bar)
        sim_seconds = time.perf_counter() - started
    sim_accuracy = float(np.mean(sim_acc.argmax(1) == y_test))
    identical = int(np.sum(np.all(sim_acc == ref_acc, axis=1)))
    same = identical == len(x_test)
    printer(f"  simulated RTL ({simulator}): int8 test accuracy {100 * sim_accuracy:.2f}%; "
            f"logits identical to the reference for {identical} of {len(x_test)} images"
            f"{' (bit-exact)' if same else ' -- MISMATCH'}; {sim_seconds:.1f} s of simulation")

    relu_zeros = sum(c["zero_activation_products"] for c in per_layer[1:])
    cycles = total["cycles"]
    printer(f"  device counters over the test split: {cycles} cycles "
            f"({' + '.join(str(c['cycles']) for c in per_layer)} by layer), "
            f"{total['macs']} MACs issued of {total['products']} products, "
            f"{total['macs_skipped']} products skipped as zero "
            f"({100 * total['macs_skipped'] / total['products']:.1f}%), of which "
            f"{relu_zeros} on ReLU zeros of the hidden layers")
    printer(f"  sparse-skip: {cycles} cycles against {dense_cycles} with it off (reference "
            f"estimate), {dense_cycles / cycles:.2f}x")
    seconds = cycles / (clock_mhz * 1e6)
    printer(f"  projected on hardware at {clock_mhz:g} MHz: {1e3 * seconds:.3f} ms for "
            f"{len(x_test)} images, {1e6 * seconds / len(x_test):.2f} us per image "
            f"(array time only: START to last output beat, host packing and DMA set-up "
            f"not included)")
    return {"status": 0 if same else 1, "float_accuracy": float_accuracy,
            "int8_accuracy": sim_accuracy, "reference_accuracy": ref_accuracy,
            "identical": identical, "images": len(x_test), "cycles": cycles,
            "dense_cycles": dense_cycles, "macs_skipped": total["macs_skipped"],
            "relu_zero_products": relu_zeros, "products": total["products"]}


def _progress(total):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="img", desc="  simulating", leave=False, dynamic_ncols=True)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def update(self, count):
        pass
