//! Turning the mounts a guest returns, which name layers, into host mounts, which name
//! paths. The paths are the host's own (`<plugin dir>/layers/<id>`, `…/work/<id>`), so
//! nothing a guest writes, now or later, can change what a mount reaches.
//!
//! The rules: only layers this plugin holds (and layers its call is making); a layer at
//! most once in what one call returns; at most [`crate::mount::OVERLAY_MAX_LAYERS`]
//! lowers; the only options are the ones the host writes. That views and committed
//! snapshots are read-only is checked above every backend, by the metadata layer.

use std::collections::HashSet;

use super::bindings::types as wit;
use super::space::{CallId, Space};
use crate::error::{Error, Result};
use crate::mount::OVERLAY_MAX_LAYERS;
use crate::snapshot::Mount;

/// Most mounts one call may return.
const MAX_MOUNTS: usize = 64;

/// Resolves `mounts`, returned by the guest during `call`; `passed` are the mounts the
/// next snapshotter returned during that call (a policy's).
pub(crate) fn resolve(
    space: &Space,
    call: CallId,
    mounts: Vec<wit::Mount>,
    passed: &[Mount],
) -> Result<Vec<Mount>> {
    if mounts.len() > MAX_MOUNTS {
        return Err(invalid(format!("{} mounts; at most {MAX_MOUNTS}", mounts.len())));
    }
    let mut seen = HashSet::new();
    let mut once = |layer: u64| {
        if seen.insert(layer) {
            Ok(())
        } else {
            Err(invalid(format!("layer {layer} appears twice")))
        }
    };
    mounts
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let resolved = match m {
                wit::Mount::Bind(b) => {
                    once(b.layer)?;
                    Ok(Mount {
                        kind: "bind".into(),
                        source: layer(space, call, b.layer)?,
                        target: String::new(),
                        options: vec!["rbind".into(), if b.readonly { "ro" } else { "rw" }.into()],
                    })
                }
                wit::Mount::Overlay(o) => {
                    if o.lowers.is_empty() {
                        return Err(invalid("an overlay mount needs at least one lower layer"));
                    }
                    if o.lowers.len() > OVERLAY_MAX_LAYERS {
                        return Err(invalid(format!(
                            "{} lower layers; overlay stacks at most {OVERLAY_MAX_LAYERS}",
                            o.lowers.len()
                        )));
                    }
                    let mut options = Vec::new();
                    if o.flags.contains(wit::OverlayFlags::INDEX_OFF) {
                        options.push("index=off".to_owned());
                    }
                    if o.flags.contains(wit::OverlayFlags::USERXATTR) {
                        options.push("userxattr".to_owned());
                    }
                    match o.upper {
                        Some(upper) => {
                            once(upper)?;
                            if o.flags.contains(wit::OverlayFlags::VOLATILE) {
                                options.push("volatile".to_owned());
                            }
                            // The layer is checked first: its work directory's lookup
                            // would call one it does not hold missing, not refused.
                            let upperdir = layer(space, call, upper)?;
                            options.push(format!("workdir={}", space.work_path(call, upper)?));
                            options.push(format!("upperdir={upperdir}"));
                        }
                        None => options.push("ro".to_owned()),
                    }
                    let mut lowers = Vec::with_capacity(o.lowers.len());
                    for l in o.lowers {
                        once(l)?;
                        lowers.push(layer(space, call, l)?);
                    }
                    options.push(format!("lowerdir={}", lowers.join(":")));
                    Ok(Mount {
                        kind: "overlay".into(),
                        source: "overlay".into(),
                        target: String::new(),
                        options,
                    })
                }
                wit::Mount::Passed(n) => passed.get(n as usize).cloned().ok_or_else(|| {
                    invalid(format!(
                        "passed({n}): the next snapshotter returned {} mounts in this call",
                        passed.len()
                    ))
                }),
            };
            resolved.map_err(|e: Error| e.context(format!("mount {i}")))
        })
        .collect()
}

/// The host path of layer `id`, if this plugin holds it: a layer it does not hold is the
/// plugin's mistake (or attack), not a missing file.
fn layer(space: &Space, call: CallId, id: u64) -> Result<String> {
    space.layer_path(call, id).map_err(|e| {
        if e.is_not_found() {
            invalid(format!("layer {id} is not one this plugin holds"))
        } else {
            e
        }
    })
}

fn invalid(message: impl Into<String>) -> Error {
    Error::invalid_argument(message)
}
