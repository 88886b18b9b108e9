#!/usr/bin/env python3
"""The tests' OTLP/HTTP trace receiver (tests/traces.rs): POST /v1/traces
(application/x-protobuf, gzip or not), decoded with opentelemetry-proto;
every span is appended to SPANS_FILE as one JSON line {"trace_id",
"span_id", "parent_span_id", "name", "kind", "attributes"}. It listens on a
free loopback port and prints it on the first line.

Usage: otlp_receiver.py SPANS_FILE   (python from scripts/test.sh's
KEYWARD_OTLP_PYTHON, which has opentelemetry-proto)"""
import gzip, json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)

out = sys.argv[1]


def value(v):
    k = v.WhichOneof("value")
    return getattr(v, k) if k in ("string_value", "int_value", "bool_value", "double_value") else str(v)


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces":
            self.send_response(404); self.end_headers(); return
        req = ExportTraceServiceRequest(); req.ParseFromString(body)
        with open(out, "a") as f:
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        f.write(json.dumps({
                            "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(), "name": s.name,
                            "kind": s.kind,
                            "attributes": {a.key: value(a.value) for a in s.attributes}}) + "\n")
        resp = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(resp)))
        self.end_headers()
        self.wfile.write(resp)

    def log_message(self, *a):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
