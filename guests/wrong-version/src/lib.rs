//! A backend plugin built against `wasnap:snapshotter@0.1.0` (see `wit/snapshotter.wit`),
//! the ABI before the host's `@0.2.0`. It exists only for the host's tests: loading it must
//! fail with a message that names both versions. Were it ever run, every call would
//! answer not-implemented.

// The glue wit-bindgen generates is FFI (raw pointers, `export_name` items), so it cannot
// be written without `unsafe`; the allowance is fenced into this one module.
#[allow(unsafe_code)]
mod bindings {
    use super::WrongVersion;

    wit_bindgen::generate!({ world: "backend", path: "wit" });
    export!(WrongVersion with_types_in self);
}

use bindings::exports::wasnap::snapshotter::{lifecycle, snapshotter};
use bindings::wasnap::snapshotter::types::{Error, Info, Labels, Mount, UsageInfo};

/// The exported component.
struct WrongVersion;

fn refuse<T>(call: &str) -> Result<T, Error> {
    Err(Error::NotImplemented(format!("wrong-version: {call}: this test plugin does nothing")))
}

impl lifecycle::Guest for WrongVersion {
    fn init(_config: String) -> Result<(), Error> {
        Ok(())
    }

    fn ping() {}
}

impl snapshotter::Guest for WrongVersion {
    fn stat(_key: String) -> Result<Info, Error> {
        refuse("stat")
    }

    fn update(_info: Info, _fieldpaths: Vec<String>) -> Result<Info, Error> {
        refuse("update")
    }

    fn usage(_key: String) -> Result<UsageInfo, Error> {
        refuse("usage")
    }

    fn mounts(_key: String) -> Result<Vec<Mount>, Error> {
        refuse("mounts")
    }

    fn prepare(
        _key: String,
        _parent: Option<String>,
        _labels: Labels,
    ) -> Result<Vec<Mount>, Error> {
        refuse("prepare")
    }

    fn view(_key: String, _parent: Option<String>, _labels: Labels) -> Result<Vec<Mount>, Error> {
        refuse("view")
    }

    fn commit(_name: String, _key: String, _labels: Labels) -> Result<(), Error> {
        refuse("commit")
    }

    fn remove(_key: String) -> Result<(), Error> {
        refuse("remove")
    }

    fn list(_after: Option<String>, _limit: u32) -> Result<Vec<Info>, Error> {
        refuse("list")
    }

    fn cleanup() -> Result<(), Error> {
        refuse("cleanup")
    }
}
