"""The KServe v2 / Triton HTTP/REST inference protocol over a :class:`~.batching.Server`
(Starlette): health, server and model metadata, model readiness and configuration, inference
with JSON tensors and the binary tensor data extension, the protocol's error bodies
(``{"error": "..."}``), and ``/metrics`` in Prometheus' text format."""

import asyncio
import json
import time

import numpy as np
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import sparsa
from sparsa.host.errors import ModelError

from .batching import QueueFull, RequestTimeout

DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT16": "int16",
             "INT32": "int32", "INT64": "int64", "UINT16": "uint16", "UINT32": "uint32",
             "UINT64": "uint64", "FP16": "float16", "FP32": "float32", "FP64": "float64"}
"""The protocol's tensor datatypes and their NumPy dtypes (BYTES is not a tensor sparsa
runs)."""
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}

HEADER_LENGTH = "Inference-Header-Content-Length"


class BadRequest(Exception):
    """A request the protocol or the model cannot take; answered 400."""


class NotServed(Exception):
    """A model (or version) the server does not serve; answered 404."""


def _error(status, message):
    return JSONResponse({"error": message}, status_code=status)


def app(server, metrics, *, request_timeout=30.0, latency_budget=None,
        max_request_bytes=64 << 20):
    """The ASGI application serving ``server``; ``request_timeout`` and ``latency_budget``
    (seconds) are the defaults a request's ``timeout`` and ``latency_budget_us`` parameters
    (microseconds) override."""

    def model_of(request):
        name = request.path_params["name"]
        model = server.models.get(name)
        version = request.path_params.get("version")
        if model is None or version not in (None, "1"):
            raise NotServed(f"model {name!r}" + (f" version {version}" if version else "")
                            + f": not served (served: {', '.join(sorted(server.models))})")
        return model

    async def live(request):
        return Response(status_code=200)

    async def ready(request):
        return Response(status_code=200 if server.ready else 503)

    async def metadata(request):
        return JSONResponse({"name": "sparsa", "version": sparsa.__version__,
                             "extensions": ["binary_tensor_data"]})

    async def model_metadata(request):
        model = model_of(request)
        compiled = model.model
        return JSONResponse({
            "name": model.name, "versions": ["1"], "platform": "sparsa",
            "inputs": [_tensor_metadata(t) for t in compiled.inputs],
            "outputs": [_tensor_metadata(t) for t in compiled.outputs]})

    async def model_config(request):
        model = model_of(request)
        config = {"name": model.name, "platform": "sparsa",
                  "max_batch_size": model.max_rows or 0,
                  "input": [_tensor_metadata(t) for t in model.model.inputs],
                  "output": [_tensor_metadata(t) for t in model.model.outputs],
                  "instance_group": [{"name": i.name, "kind": i.kind, "count": i.workers}
                                     for i in server.instances]}
        if model.batching:
            config["dynamic_batching"] = {
                "max_queue_delay_microseconds": int(model.max_queue_delay * 1e6)}
        return JSONResponse(config)

    async def model_ready(request):
        model_of(request)
        return Response(status_code=200 if server.ready else 503)

    async def infer(request):
        arrived = time.monotonic()
        model = model_of(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            metrics.answered(model.name, "bad_request")
            return _error(413, f"the request is {int(length)} bytes; at most "
                               f"{max_request_bytes} are read")
        try:
            body = await request.body()
            header, inputs, wanted = _parse(body, request.headers.get(HEADER_LENGTH), model)
            parameters = _parameters(header, "the request")
            timeout = _micros(parameters, "timeout", request_timeout)
            budget = _micros(parameters, "latency_budget_us", latency_budget)
            pending = model.submit(inputs, budget=budget, timeout=timeout)
        except (BadRequest, ModelError) as error:
            metrics.answered(model.name, "bad_request")
            return _error(400, str(error))
        except QueueFull as error:
            metrics.answered(model.name, "queue_full")
            return _error(503, str(error))
        try:
            outputs = await asyncio.wait_for(asyncio.wrap_future(pending.future),
                                             timeout=timeout)
        except (asyncio.TimeoutError, RequestTimeout):
            metrics.answered(model.name, "timeout")
            return _error(504, f"model {model.name!r}: no answer within {timeout:g} s")
        except ModelError as error:
            metrics.answered(model.name, "bad_request")
            return _error(400, str(error))
        except Exception as error:  # noqa: BLE001  (the protocol's error body, not a trace)
            metrics.answered(model.name, "error")
            return _error(500, f"model {model.name!r}: {type(error).__name__}: {error}")
        metrics.answered(model.name, "success", time.monotonic() - arrived)
        return _response(model, header, outputs, wanted)

    async def metrics_page(request):
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [Route("/v2/health/live", live), Route("/v2/health/ready", ready),
              Route("/v2", metadata), Route("/metrics", metrics_page)]
    for base in (model, versioned):
        routes += [Route(base, model_metadata), Route(base + "/ready", model_ready),
                   Route(base + "/config", model_config),
                   Route(base + "/infer", infer, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={
        NotServed: lambda request, error: _error(404, str(error))})


def _tensor_metadata(info):
    return {"name": info.name, "datatype": _NAMES.get(info.dtype, info.dtype.upper()),
            "shape": [-1 if d is None else d for d in info.shape]}


def _parameters(entry, where):
    """An entry's ``parameters`` object ({} when absent)."""
    parameters = entry.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}: parameters: expected a JSON object, got "
                         f"{type(parameters).__name__}")
    return parameters


def _micros(parameters, name, default):
    value = parameters.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise BadRequest(f"parameter {name!r}: expected a positive number of microseconds, "
                         f"got {value!r}")
    return value / 1e6


def _parse(body, header_length, model):
    """The request's JSON header, its inputs by name (arrays) and the outputs asked for as
    ``{name: binary}``; :class:`BadRequest` naming what is wrong."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"{HEADER_LENGTH}: expected at most the body's {len(body)} "
                             f"bytes, got {header_length!r}")
        split = int(header_length)
    else:
        split = len(body)
    try:
        header = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError) as error:
        raise BadRequest(f"the request's JSON: {error}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise BadRequest("the request: expected a JSON object with an 'inputs' list")
    binary = memoryview(body)[split:]
    offset = 0
    inputs = {}
    for entry in header["inputs"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest("inputs: each needs a name, shape and datatype")
        name = entry["name"]
        shape, datatype = entry.get("shape"), entry.get("datatype")
        if datatype not in DATATYPES:
            raise BadRequest(f"input {name!r}: datatype {datatype!r}: expected one of "
                             f"{', '.join(DATATYPES)}")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise BadRequest(f"input {name!r}: shape {shape!r}: expected a list of sizes")
        dtype = np.dtype(DATATYPES[datatype])
        count = int(np.prod(shape, dtype=np.int64))
        size = _parameters(entry, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize \
                    or offset + size > len(binary):
                raise BadRequest(f"input {name!r}: binary_data_size {size!r}: expected "
                                 f"{count * dtype.itemsize} bytes for {datatype} {shape}, "
                                 f"{len(binary) - offset} left in the body")
            value = np.frombuffer(binary[offset:offset + size], dtype).reshape(shape)
            offset += size
        else:
            data = entry.get("data")
            try:
                value = np.asarray(data, dtype=dtype)
            except (TypeError, ValueError, OverflowError) as error:
                raise BadRequest(f"input {name!r}: data: {error}") from None
            if data is None or value.size != count:
                raise BadRequest(f"input {name!r}: expected {count} values of {datatype} "
                                 f"for shape {shape}, got "
                                 f"{'none' if data is None else value.size}")
            value = value.reshape(shape)
        if name in inputs:
            raise BadRequest(f"input {name!r}: given twice")
        inputs[name] = value
    if offset != len(binary):
        raise BadRequest(f"the body has {len(binary) - offset} bytes of binary data no input "
                         f"names")
    every_binary = bool(_parameters(header, "the request").get("binary_data_output", False))
    names = [t.name for t in model.model.outputs]
    asked = header.get("outputs")
    if asked is None:
        wanted = {name: every_binary for name in names}
    else:
        if not isinstance(asked, list) or not all(
                isinstance(o, dict) and o.get("name") in names for o in asked):
            raise BadRequest(f"outputs: expected a list of the model's outputs "
                             f"({', '.join(names)})")
        wanted = {o["name"]: bool(_parameters(o, f"output {o['name']!r}").get(
            "binary_data", every_binary)) for o in asked}
    return header, inputs, wanted


def _response(model, header, outputs, wanted):
    entries, blobs = [], []
    for info, value in zip(model.model.outputs, outputs):
        if info.name not in wanted:
            continue
        value = np.ascontiguousarray(value)
        entry = {"name": info.name, "datatype": _NAMES[value.dtype.name],
                 "shape": list(value.shape)}
        if wanted[info.name]:
            blob = value.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = value.reshape(-1).tolist()
        entries.append(entry)
    document = {"model_name": model.name, "model_version": "1", "outputs": entries}
    if "id" in header:
        document["id"] = header["id"]
    text = json.dumps(document).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(b"".join([text, *blobs]), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(text))})
