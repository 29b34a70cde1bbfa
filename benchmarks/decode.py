"""Decode benchmark: protobuf's ParseFromString, the Python decoder and the compiled one,
in spans/s on the same requests, in one process and one run.

    python -m benchmarks.decode            # about 30 seconds
    python -m benchmarks.decode --quick    # about 10 seconds

The requests are the ingest benchmark's (``benchmarks.ingest``, lane 0): 512 to 1000 spans
each, about 15 attributes per span (code.*, http.*, db.*, ...), 11 resource attributes,
popular code locations drawn from a Zipf law over ``--locations``, 1% of spans failing
with an exception event. Decoders:

- ``ParseFromString``: upb parses the bytes into messages and nothing reads them; the
  floor of any decoder that goes through protobuf's Python objects.
- ``decode_request_python``: ParseFromString plus the Python walk (decode_message).
- ``decode_request_compiled``: processor.receiver._fastdecode plus building the Batch
  (numpy views of its columns, Location objects).
- ``_fastdecode.decode``: the C function alone, without building the Batch.
- ``json.loads (OTLP/JSON)``, ``json_request (OTLP/JSON)``, ``json_request + decode_request``:
  the same requests as OTLP/JSON bodies (``otlp_json``), parsed by the standard library
  alone, converted to protobuf bytes (processor.receiver.otlpjson), and converted and
  decoded: what an OTLP/HTTP JSON body costs where a protobuf body costs ``decode_request``.

Rounds interleave the decoders, so that the noise of a shared machine hits them alike;
within a round each decoder decodes all requests at least ``--min-pass`` seconds long.
The best and the median of the per-pass rates are printed, and the ratios of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time


def build_requests(n_requests: int, locations: int, seed: int) -> list[bytes]:
    from benchmarks.ingest import Workload, lane_requests

    w = Workload(lanes=8, locations=locations, spans_min=512, spans_max=1000, gap_ns=2_000_000,
                 seed=seed, coverage="zipf", templates=6)
    reqs, _, _ = lane_requests(w, 0, n_requests)
    return reqs


def otlp_json(request: bytes) -> bytes:
    """An ExportTraceServiceRequest as an OTLP/JSON body: protobuf's JSON mapping, with the
    trace and span ids in hex and enums as integers (as the OTLP specification writes them)."""
    import base64
    import json

    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    obj = json_format.MessageToDict(ExportTraceServiceRequest.FromString(request), use_integers_for_enums=True)
    for rs in obj.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for item in [span, *span.get("links", [])]:
                    for name in ("traceId", "spanId", "parentSpanId"):
                        if name in item:
                            item[name] = base64.b64decode(item[name]).hex()
    return json.dumps(obj).encode()


def describe(reqs: list[bytes]) -> dict:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from processor.receiver.decode import decode_request_python

    spans = attrs = locs = 0
    for b in reqs:
        req = ExportTraceServiceRequest()
        req.ParseFromString(b)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                spans += len(ss.spans)
                attrs += sum(len(sp.attributes) for sp in ss.spans)
        locs += len(decode_request_python(b).locations)
    return {"requests": len(reqs), "spans": spans, "bytes_per_span": sum(map(len, reqs)) / spans,
            "json_bytes_per_span": sum(len(otlp_json(b)) for b in reqs) / spans,
            "attrs_per_span": attrs / spans, "locations_per_request": locs / len(reqs)}


def check_identical(reqs: list[bytes]) -> None:
    import numpy as np

    from processor.receiver.decode import compiled_batch, decode_request_python

    for b in reqs:
        fast, ref = compiled_batch(b), decode_request_python(b)
        assert fast is not None, "the compiled decoder left a benchmark request to Python"
        assert fast.locations == ref.locations and fast.versions == ref.versions
        assert fast.exceptions == ref.exceptions and fast.reasons == ref.reasons
        for col in ("loc", "ver", "start", "end", "error", "trace_id"):
            assert np.array_equal(getattr(fast, col), getattr(ref, col)), col


def check_json_round_trip(reqs: list[bytes]) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from processor.receiver.otlpjson import json_request

    for b in reqs:
        assert ExportTraceServiceRequest.FromString(json_request(otlp_json(b))) == \
            ExportTraceServiceRequest.FromString(b), "OTLP/JSON did not give the same request back"


def decoders() -> dict:
    """Name -> (function, True when it takes the OTLP/JSON body of a request)."""
    import json

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from processor.receiver import decode
    from processor.receiver.otlpjson import json_request

    def parse(b):
        ExportTraceServiceRequest().ParseFromString(b)

    out = {"ParseFromString": (parse, False), "decode_request_python": (decode.decode_request_python, False)}
    if decode._compiled is not None:
        out["decode_request_compiled"] = (decode.decode_request_compiled, False)
        out["_fastdecode.decode (C only)"] = (decode._compiled.decode, False)
    out["json.loads (OTLP/JSON)"] = (json.loads, True)
    out["json_request (OTLP/JSON)"] = (json_request, True)
    out["json_request + decode_request"] = (lambda b: decode.decode_request(json_request(b)), True)
    return out


def measure(fns: dict, reqs: list[bytes], spans: int, rounds: int, min_pass: float) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {name: [] for name in fns}
    bodies = {False: reqs, True: [otlp_json(b) for b in reqs]}
    for _ in range(rounds):
        for name, (fn, takes_json) in fns.items():
            t_end = time.perf_counter() + min_pass
            while True:
                t0 = time.perf_counter()
                for b in bodies[takes_json]:
                    fn(b)
                t1 = time.perf_counter()
                rates[name].append(spans / (t1 - t0))
                if t1 >= t_end:
                    break
    return rates


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=24, help="requests decoded per pass (default 24)")
    p.add_argument("--locations", type=int, default=2000, help="code locations the spans are drawn from")
    p.add_argument("--rounds", type=int, default=5, help="rounds over all decoders (default 5)")
    p.add_argument("--min-pass", type=float, default=0.5, help="seconds per decoder and round (default 0.5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.rounds, args.min_pass = 8, 3, 0.25

    from processor.receiver import decode

    reqs = build_requests(args.requests, args.locations, args.seed)
    info = describe(reqs)
    if decode._compiled is not None:
        check_identical(reqs)
    check_json_round_trip(reqs)
    fns = decoders()
    rates = measure(fns, reqs, info["spans"], args.rounds, args.min_pass)

    print(f"{info['requests']} requests, {info['spans']:,} spans "
          f"({info['spans'] / info['requests']:.0f} per request), {info['bytes_per_span']:.0f} bytes "
          f"({info['json_bytes_per_span']:.0f} as OTLP/JSON) and "
          f"{info['attrs_per_span']:.1f} attributes per span, {info['locations_per_request']:.0f} locations "
          f"per request; {args.rounds} rounds")
    if decode._compiled is None:
        print("processor.receiver._fastdecode is not built: only the Python decoder is measured")
    elif not decode.COMPILED:
        print("BACKFLOW_PURE_PYTHON is set: decode_request would use Python; both are measured anyway")
    med = {name: statistics.median(r) for name, r in rates.items()}
    py, parse = med["decode_request_python"], med["ParseFromString"]
    print(f"{'decoder':<30} {'best spans/s':>14} {'median spans/s':>15} {'x Python':>9} {'x ParseFromString':>18}")
    for name, r in rates.items():
        print(f"{name:<30} {max(r):>14,.0f} {med[name]:>15,.0f} {med[name] / py:>9.2f} {med[name] / parse:>18.2f}")


if __name__ == "__main__":
    main()
