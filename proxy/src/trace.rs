//! OTLP traces, when an endpoint is configured: one client span per
//! proxied request, the child of the caller's W3C `traceparent`. The
//! upstream request (and a tunnel's `TunnelOpen`) carries the proxy's span
//! as its parent. Without an endpoint the proxy records nothing and passes
//! the caller's `traceparent` through unchanged.

use std::time::Duration;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};

/// Starts exporting spans over OTLP/gRPC to `endpoint`
/// (`http://host:4317`). Shut the provider down off the runtime's threads
/// (`spawn_blocking`): its exports run on this runtime.
pub fn otlp(endpoint: &str, service: &str) -> Result<SdkTracerProvider, String> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "OTLP needs a running tokio runtime".to_string())?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("otlpEndpoint {endpoint:?}: {e}"))?;
    let processor = BatchSpanProcessor::builder(OnRuntime {
        inner: exporter,
        runtime,
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_scheduled_delay(Duration::from_millis(500))
            .build(),
    )
    .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build())
}

/// The SDK exports from a thread of its own, but the gRPC client needs
/// tokio's reactor: each export runs on the proxy's runtime.
#[derive(Debug)]
struct OnRuntime {
    inner: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let result = self.runtime.block_on(self.inner.export(batch));
        std::future::ready(result)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// One request's span, ended when dropped.
#[allow(missing_debug_implementations)] // The context has no Debug.
pub struct RequestSpan {
    cx: Context,
}

impl RequestSpan {
    /// Starts a span for a request to `service`, the child of the caller's
    /// `traceparent` if any, and rewrites `headers` so that the upstream
    /// sees this span as its parent.
    pub fn start(tracer: &SdkTracer, service: &str, headers: &mut HeaderMap) -> Self {
        let propagator = TraceContextPropagator::new();
        let parent = propagator.extract(&Headers(headers));
        let span = tracer
            .span_builder(format!("{service} outbound"))
            .with_kind(SpanKind::Client)
            .with_attributes([KeyValue::new("fedmesh.service", service.to_string())])
            .start_with_context(tracer, &parent);
        let cx = parent.with_span(span);
        propagator.inject_context(&cx, &mut HeadersMut(headers));
        Self { cx }
    }

    /// Where the request went and how it ended.
    pub fn finish(&self, cluster: &str, status: u16, attempts: usize) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("fedmesh.cluster", cluster.to_string()));
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        span.set_attribute(KeyValue::new("fedmesh.attempts", attempts as i64));
        if status >= 500 {
            span.set_status(Status::error(format!("answered {status}")));
        }
    }
}

impl Drop for RequestSpan {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}
