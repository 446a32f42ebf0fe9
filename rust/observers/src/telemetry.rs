//! Trace context and spans.
//!
//! An application attaches a W3C `traceparent` to the changes of a transaction (`SET LOCAL
//! fraiseql.traceparent = '00-…'` with trigger capture, or `SELECT fraiseql_traceparent('00-…')`
//! with either capture); it travels with the change — in the event, a `traceparent` NATS
//! header, a `traceparent` webhook header — so the receivers' traces continue the writer's.
//!
//! With `[observers.telemetry] otlp_endpoint` set, the engine records spans, exported over
//! OTLP/HTTP (protobuf) with the OpenTelemetry SDK's batch processor: `capture` (one per
//! change, starting at its commit time, child of the writer's span), under it `condition`
//! (one per observer of the change's entity and event, with whether it matched), under that
//! `action` (one per attempt, with its outcome). An action's outgoing `traceparent` is its
//! attempt's span.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::config::TelemetryConfig;
use crate::error::{ConnectErrorKind, Error, Result};
use crate::event::Event;

const TRACEPARENT: &str = "traceparent";

tokio::task_local! {
    /// The `traceparent` an action attempt sends on: its own span's.
    static OUTGOING: String;
}

/// Whether `s` is a W3C `traceparent` (version 00, or a later one that starts the same way):
/// `vv-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, ids not all zeros.
pub fn valid_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let [version, trace, parent, flags, ..] = parts[..] else {
        return false;
    };
    hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.len() == 4)
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
}

/// The `traceparent` an action or a publish sends for `event`: the current attempt's span
/// when spans are recorded, else the one that came with the change.
pub fn outgoing(event: &Event) -> Option<String> {
    OUTGOING
        .try_with(Clone::clone)
        .ok()
        .or_else(|| event.traceparent.clone().filter(|tp| valid_traceparent(tp)))
}

/// The spans of one engine: a tracer, or nothing (spans off, nothing recorded).
#[derive(Clone, Default)]
pub struct Spans {
    tracer: Option<SdkTracer>,
}

/// The OTLP exporter of a process; [`Telemetry::shutdown`] sends what is buffered.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Starts exporting to `config.otlp_endpoint`, if set.
    pub async fn start(config: &TelemetryConfig) -> Result<Option<Telemetry>> {
        let Some(endpoint) = config.otlp_endpoint.clone() else {
            return Ok(None);
        };
        let endpoint = if endpoint.trim_end_matches('/').ends_with("/v1/traces") {
            endpoint
        } else {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        };
        let service = config.service_name.clone();
        crate::transport::use_ring_for_tls();
        // The exporter's HTTP client is a blocking one, made and used off the runtime.
        let provider = tokio::task::spawn_blocking(move || {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(endpoint)
                .with_timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| {
                    Error::connect(
                        ConnectErrorKind::InvalidSettings,
                        format!("observers.telemetry.otlp_endpoint: {e}"),
                    )
                })?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build();
            Ok::<_, Error>(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        })
        .await
        .map_err(|e| Error::Engine(format!("starting telemetry: {e}")))??;
        Ok(Some(Telemetry { provider }))
    }

    pub fn spans(&self) -> Spans {
        Spans {
            tracer: Some(self.provider.tracer("fraiseql")),
        }
    }

    /// Exports what is buffered and stops.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = provider.shutdown() {
                tracing::warn!("[observers] telemetry: {e}");
            }
        })
        .await;
    }
}

/// A span being recorded, or nothing when spans are off.
pub struct Recorded(Option<Context>);

impl Spans {
    pub fn enabled(&self) -> bool {
        self.tracer.is_some()
    }

    /// The `capture` span of a change: from its commit time, under the writer's span.
    pub fn capture(&self, event: &Event) -> Recorded {
        let Some(tracer) = &self.tracer else {
            return Recorded(None);
        };
        let parent = match event
            .traceparent
            .as_deref()
            .filter(|tp| valid_traceparent(tp))
        {
            Some(tp) => TraceContextPropagator::new()
                .extract(&HashMap::from([(TRACEPARENT.to_owned(), tp.to_owned())])),
            None => Context::new(),
        };
        let start = chrono::DateTime::parse_from_rfc3339(&event.timestamp)
            .map_or_else(|_| SystemTime::now(), SystemTime::from);
        let span = tracer
            .span_builder(format!(
                "capture {}.{}",
                event.entity,
                event.event.as_lower()
            ))
            .with_kind(SpanKind::Consumer)
            .with_start_time(start)
            .with_attributes([
                KeyValue::new("fraiseql.event.id", event.id.clone()),
                KeyValue::new("fraiseql.entity", event.entity.clone()),
                KeyValue::new("fraiseql.event", event.event.as_str()),
                KeyValue::new("db.collection.name", event.table.clone()),
            ])
            .start_with_context(tracer, &parent);
        Recorded(Some(parent.with_span(span)))
    }

    /// An observer's `condition` span under `capture`.
    pub fn condition(&self, capture: &Recorded, observer: &str, matched: bool) -> Recorded {
        self.child(
            capture,
            format!("condition {observer}"),
            SpanKind::Internal,
            vec![
                KeyValue::new("fraiseql.observer", observer.to_owned()),
                KeyValue::new("fraiseql.matched", matched),
            ],
        )
    }

    /// One attempt of an action, under its observer's `condition` span.
    pub fn action(&self, condition: &Recorded, kind: &str, attempt: u32) -> Recorded {
        self.child(
            condition,
            format!("action {kind}"),
            SpanKind::Client,
            vec![
                KeyValue::new("fraiseql.action", kind.to_owned()),
                KeyValue::new("fraiseql.attempt", i64::from(attempt)),
            ],
        )
    }

    fn child(
        &self,
        parent: &Recorded,
        name: String,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Recorded {
        match (&self.tracer, &parent.0) {
            (Some(tracer), Some(cx)) => {
                let span = tracer
                    .span_builder(name)
                    .with_kind(kind)
                    .with_attributes(attributes)
                    .start_with_context(tracer, cx);
                Recorded(Some(cx.with_span(span)))
            }
            _ => Recorded(None),
        }
    }
}

impl Recorded {
    /// Runs `future` with this span's `traceparent` as the outgoing one.
    pub async fn scope<F: std::future::Future>(&self, future: F) -> F::Output {
        let Some(cx) = &self.0 else {
            return future.await;
        };
        let mut headers = HashMap::new();
        TraceContextPropagator::new().inject_context(cx, &mut headers);
        match headers.remove(TRACEPARENT) {
            Some(tp) => OUTGOING.scope(tp, future).await,
            None => future.await,
        }
    }

    /// Ends the span with its outcome (`success`, `retry`, `failed`, `skipped`…), an error
    /// message making it an error span.
    pub fn end(self, outcome: &str, error: Option<&str>) {
        let Some(cx) = self.0 else {
            return;
        };
        let span = cx.span();
        span.set_attribute(KeyValue::new("fraiseql.outcome", outcome.to_owned()));
        match error {
            Some(message) => span.set_status(Status::error(message.to_owned())),
            None => span.set_status(Status::Ok),
        }
        span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_checked() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47\0-00f067aa0ba902b7-01",
        ] {
            assert!(!valid_traceparent(bad), "{bad:?}");
        }
    }
}
