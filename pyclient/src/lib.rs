//! The native half of the PyProxy client (`pyproxy._native`).

use pyo3::prelude::*;

/// The protocol version this client speaks.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PROTOCOL_VERSION", pyproxy::protocol::PROTOCOL_VERSION)?;
    Ok(())
}
