"""OpenTelemetry tracing: FastAPI, SQLAlchemy and Redis spans exported over OTLP/HTTP.

Off unless an OTLP endpoint is configured with the standard variables
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); then nothing
is instrumented, so tracing costs nothing on the request path. Everything else —
service name, resource attributes, sampler, headers, timeouts — is read by the SDK from
the other ``OTEL_*`` variables. Context propagates with W3C ``traceparent``.
"""

import os

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

DEFAULT_SERVICE_NAME = "fastapi-ops-service"
# Probes and scrapes are frequent and uninteresting as traces.
EXCLUDED_URLS = "/health/live,/health/ready,/metrics"


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
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls=EXCLUDED_URLS)


def instrument_engine(engine: AsyncEngine, provider: TracerProvider) -> None:
    SQLAlchemyInstrumentor().instrument(engine=engine.sync_engine, tracer_provider=provider)


def instrument_redis(client: Redis, provider: TracerProvider) -> None:
    RedisInstrumentor.instrument_client(client, tracer_provider=provider)


def uninstrument_engines() -> None:
    # The instrumentor is a process-wide singleton: release it with the engine, so an
    # app created later in the same process (tests, reloads) instruments its own.
    SQLAlchemyInstrumentor().uninstrument()


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
