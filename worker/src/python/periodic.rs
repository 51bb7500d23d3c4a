//! The periodic schedules the task modules declare (`dbtask.periodic(...)` at module level),
//! read once at start-up from `dbtask._worker.PERIODIC`: each one's declaration as JSON, which
//! `dbtask_protocol::periodic::PeriodicSpec::from_json` checks when the worker applies them.

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The declarations, by schedule name, sorted; none when the package predates them.
pub(super) fn declared(registry: &Bound<'_, PyModule>) -> PyResult<Vec<(String, String)>> {
    let Ok(periodic) = registry.getattr("PERIODIC") else {
        return Ok(Vec::new());
    };
    let periodic = periodic.cast_into::<PyDict>()?;
    let mut out = Vec::with_capacity(periodic.len());
    for (name, declaration) in periodic.iter() {
        out.push((name.extract()?, declaration.extract()?));
    }
    out.sort();
    Ok(out)
}
