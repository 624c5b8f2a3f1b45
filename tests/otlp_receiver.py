"""A loopback OTLP/HTTP trace collector: decodes what an exporter sends with `opentelemetry-proto`
(the protocol's own message definitions), the way an OpenTelemetry Collector would."""

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from support import free_port

KINDS = {Span.SPAN_KIND_INTERNAL: "INTERNAL", Span.SPAN_KIND_CLIENT: "CLIENT", Span.SPAN_KIND_SERVER: "SERVER",
         Span.SPAN_KIND_PRODUCER: "PRODUCER", Span.SPAN_KIND_CONSUMER: "CONSUMER"}


def _value(any_value: Any) -> Any:
    field = any_value.WhichOneof("value")
    if field == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, field) if field else None


def _attributes(pairs: Any) -> dict:
    return {pair.key: _value(pair.value) for pair in pairs}


class OtlpReceiver:
    """POST /v1/traces; every span received, as a dict with its resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._received(self.path, self.headers.get("Content-Type"), body)
                data = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _received(self, path: str, content_type: str, body: bytes) -> None:
        assert path == "/v1/traces" and content_type == "application/x-protobuf", (path, content_type)
        request = ExportTraceServiceRequest.FromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append({"name": span.name, "kind": KINDS[span.kind], "trace_id": span.trace_id.hex(),
                                  "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex() or None,
                                  "attributes": _attributes(span.attributes), "resource": resource,
                                  "agent": resource.get("service.instance.id"), "error": span.status.code == 2})
        with self._cond:
            self.spans.extend(spans)
            self._cond.notify_all()

    def wait_for(self, where: Callable[[dict], bool], count: int = 1, timeout: float = 20) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [span for span in self.spans if where(span)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(found)} of {count} spans arrived within {timeout} s; received: "
                                         f"{[(s['agent'], s['name']) for s in self.spans]}")
                self._cond.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
