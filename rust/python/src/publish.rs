//! `fraiseql.Publisher` / `fraiseql.publish(...)`: an application publishes a change to
//! JetStream itself, in exactly the format the bridge uses (subject
//! `{prefix}.{entity}.{event}`, the spec's body plus `id` and `old`, `Nats-Msg-Id` = the event
//! id), and gets back once the PubAck arrived.

use std::collections::HashMap;

use fraiseql_observers::transport::nats::NatsPublisher;
use fraiseql_observers::{Error, NatsMetrics};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::engine::{build_event, dict_source, entity_defs, load_config, Source};
use crate::errors::PyFraiseError;
use crate::runtime::runtime;

#[pyclass(name = "Publisher", module = "fraiseql._native", frozen)]
pub struct PyPublisher {
    publisher: NatsPublisher,
    tables: HashMap<String, String>,
}

#[pymethods]
impl PyPublisher {
    /// Connects to the NATS server of `[observers.nats]` and creates or updates the stream, so
    /// a publish never goes to a subject no stream captures.
    #[new]
    #[pyo3(signature = (main=None, runtime_file=None, config=None, entities=None))]
    fn new(
        py: Python<'_>,
        main: Source,
        runtime_file: Source,
        config: Option<&Bound<'_, PyDict>>,
        entities: Option<&Bound<'_, PyList>>,
    ) -> PyResult<Self> {
        let main = dict_source(config)?.or(main);
        let config = load_config(&main, &runtime_file)?;
        let tables = entities
            .map(entity_defs)
            .transpose()?
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.name, e.table))
            .collect();
        let nats_config = config.observers.nats.clone();
        if nats_config.url.is_none() {
            return Err(PyFraiseError(Error::Transport(
                "fraiseql.publish needs a NATS server: set [observers.nats] url (or nats_url, or FRAISEQL_NATS_URL)".into(),
            ))
            .into());
        }
        let publisher = py
            .detach(|| runtime().block_on(NatsPublisher::connect(&nats_config, NatsMetrics::new())))
            .map_err(PyFraiseError)?
            .for_config(&config);
        Ok(PyPublisher { publisher, tables })
    }

    /// Publishes one change and waits for its PubAck; returns the event id. A publish that
    /// fails is retried with the same id (the stream's duplicate window absorbs a retry of
    /// one that was in fact stored); an error is raised only when it could not be stored.
    #[pyo3(signature = (entity, event, new=None, old=None, id=None))]
    fn publish(
        &self,
        py: Python<'_>,
        entity: String,
        event: &str,
        new: Option<&Bound<'_, PyAny>>,
        old: Option<&Bound<'_, PyAny>>,
        id: Option<String>,
    ) -> PyResult<String> {
        let ev = build_event(&self.tables, entity, event, new, old, id)?;
        py.detach(|| runtime().block_on(self.publisher.publish(&ev)))
            .map_err(PyFraiseError)?;
        Ok(ev.id)
    }

    /// [`Self::publish`] as an awaitable.
    #[pyo3(signature = (entity, event, new=None, old=None, id=None))]
    fn publish_async<'py>(
        &self,
        py: Python<'py>,
        entity: String,
        event: &str,
        new: Option<&Bound<'_, PyAny>>,
        old: Option<&Bound<'_, PyAny>>,
        id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ev = build_event(&self.tables, entity, event, new, old, id)?;
        let publisher = self.publisher.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            publisher.publish(&ev).await.map_err(PyFraiseError)?;
            Ok(ev.id)
        })
    }
}
