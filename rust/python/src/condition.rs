use fraiseql_observers::Condition;
use pyo3::prelude::*;

use crate::convert::row_from_py;
use crate::errors::condition_error;

/// `fraiseql._native.Condition(expr, fields=None)`: compiled once, evaluated many times.
#[pyclass(name = "Condition", module = "fraiseql._native", frozen)]
pub struct PyCondition {
    inner: Condition,
}

#[pymethods]
impl PyCondition {
    #[new]
    #[pyo3(signature = (expr, fields=None))]
    fn new(expr: &str, fields: Option<Vec<String>>) -> PyResult<Self> {
        Condition::compile(expr, fields.as_deref())
            .map(|inner| PyCondition { inner })
            .map_err(|e| condition_error(e.to_string(), e.line(), e.column()))
    }

    #[pyo3(signature = (new=None, old=None))]
    fn evaluate(
        &self,
        new: Option<&Bound<'_, PyAny>>,
        old: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let new = row_from_py(new, "new")?;
        let old = row_from_py(old, "old")?;
        Ok(self.inner.evaluate(new.as_ref(), old.as_ref()))
    }

    #[getter]
    fn source(&self) -> &str {
        self.inner.source()
    }

    fn __repr__(&self) -> String {
        format!("Condition({:?})", self.inner.source())
    }
}
