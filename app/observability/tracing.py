"""OpenTelemetry tracing: FastAPI, SQLAlchemy and Redis spans exported over OTLP/HTTP.

Off unless an OTLP endpoint is configured with the standard variables
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); then nothing
is instrumented, so tracing costs nothing on the request path. Everything else —
service name, resource attributes, sampler, headers, timeouts — is read by the SDK from
the other ``OTEL_*`` variables. Context propagates with W3C ``traceparent``.
"""

import os
from contextlib import AbstractContextManager
from typing import Any

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from sqlalchemy.ext.asyncio import AsyncEngine

from app.observability.redaction import redact_query

DEFAULT_SERVICE_NAME = "fastapi-ops-service"
# Probes and scrapes are frequent and uninteresting as traces.
EXCLUDED_URLS = "/health/live,/health/ready,/metrics"
# The server span's attributes that hold the query string, in the old and the new HTTP
# semantic conventions (OTEL_SEMCONV_STABILITY_OPT_IN chooses).
QUERY_ATTRIBUTES = ("http.url", "http.target", "url.full", "url.query")


def tracer_provider_from_env() -> TracerProvider | None:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    # Imported only when used: the exporter pulls in protobuf and an HTTP client.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, in that order; the
    # default name only stands in for none (attributes given here would override both).
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def instrument_app(app: FastAPI, provider: TracerProvider) -> None:
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=provider,
        excluded_urls=EXCLUDED_URLS,
        server_request_hook=redact_query_attributes,
    )


def redact_query_attributes(span: trace.Span, scope: dict[str, Any]) -> None:
    """Blank credentials in the query string the instrumentation copied into the server
    span. The service refuses tokens in URLs (README), but a client may still send one,
    and the span would carry it, valid, to whoever reads the traces."""
    attributes = getattr(span, "attributes", None)  # the SDK's recording spans have them
    if not scope.get("query_string") or not attributes:
        return
    for name in QUERY_ATTRIBUTES:
        value = attributes.get(name)
        if isinstance(value, str) and (redacted := redact_query(value)) != value:
            span.set_attribute(name, redacted)


def instrument_clients(engine: AsyncEngine, provider: TracerProvider) -> None:
    """Spans for the database and every Redis client: process-wide for Redis, as the rate
    limiter's client is made inside the ``limits`` library."""
    SQLAlchemyInstrumentor().instrument(engine=engine.sync_engine, tracer_provider=provider)
    RedisInstrumentor().instrument(tracer_provider=provider)


def untraced() -> AbstractContextManager[object]:
    """No spans for the work done in here, nor for the tasks created in here, for their
    whole life: probes and the periodic jobs (epoch sync, broker, sweeps). Outside any
    request, each of their database and Redis calls would start a trace of its own —
    the epoch sync alone some 86,000 a day per worker — and bury the requests' traces."""
    return suppress_instrumentation()


def uninstrument_clients() -> None:
    # The instrumentors are process-wide singletons: released with the engine, so an app
    # created later in the same process (tests, reloads) instruments with its provider.
    SQLAlchemyInstrumentor().uninstrument()
    RedisInstrumentor().uninstrument()


def is_sampled() -> bool:
    """Whether the current span is recorded and exported: only such a trace may be an
    exemplar's (an unsampled one's ids, in log lines, still join them across services)."""
    return bool(trace.get_current_span().get_span_context().trace_flags.sampled)


def current_span_ids() -> dict[str, str]:
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
    }
