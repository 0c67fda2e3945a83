//! A backend plugin that misbehaves on purpose. It exists only for the host's tests, which
//! load it to prove that the sandbox contains a plugin that spins, hogs memory, panics,
//! floods its output or its errors, opens without end, returns mounts that break the
//! host's rules, walks without end, races host functions against swaps, or tries to
//! reach above its layers and its private directory. See README.md for each mode.
//!
//! With the configuration `null` or `{"mode": "good"}` it is a small but correct
//! in-memory snapshotter (`store`), so a test can check that the host recovers once a
//! misbehaving call is over.

mod config;
mod misbehave;
mod store;

use config::{Config, Mode};
use misbehave::Call;

// The glue wit-bindgen generates is FFI (raw pointers, `export_name` items), so it cannot
// be written without `unsafe`; the allowance is fenced into this one module.
#[allow(unsafe_code)]
mod bindings {
    use super::Adversary;

    wit_bindgen::generate!({ world: "backend", path: "../../wit" });
    export!(Adversary with_types_in self);
}

use bindings::exports::wasnap::snapshotter::{lifecycle, snapshotter};
use bindings::wasnap::snapshotter::types::{Error, Info, Kind, Labels, Mount, UsageInfo};

/// The exported component.
struct Adversary;

impl lifecycle::Guest for Adversary {
    fn init(config: String) -> Result<(), Error> {
        let parsed = Config::parse(&config)?;
        match parsed.mode {
            Mode::SlowInit => misbehave::spin(),
            Mode::SleepInit => misbehave::sleep(),
            Mode::BadInit => {
                return Err(Error::InvalidArgument(format!(
                    "adversary: initialising with {config}: mode bad-init always refuses"
                )));
            }
            _ => {}
        }
        config::set(parsed);
        Ok(())
    }

    fn ping() {}
}

impl snapshotter::Guest for Adversary {
    fn stat(key: String) -> Result<Info, Error> {
        let call = Call::new("stat", &[&key]);
        misbehave::common(call);
        // The attacks that answer in an error run on `stat` of a key that names them.
        if call.targeted() {
            match config::get().mode {
                Mode::FloodError(bytes) if key.contains("flood") => {
                    return Err(misbehave::flood_error(bytes));
                }
                Mode::FdBomb if key.contains("fdbomb") => return Err(misbehave::fd_bomb()),
                Mode::DiskBomb if key.contains("diskbomb") => return Err(misbehave::disk_bomb()),
                Mode::Hammer(op, n) if key.contains("hammer") => {
                    // `hammer-<op>` picks another op than the configuration's: two
                    // instances of one plugin can race two different calls.
                    let op = key
                        .rsplit_once("hammer-")
                        .and_then(|(_, o)| config::Op::parse(o))
                        .unwrap_or(op);
                    let (ok, refused, last) = misbehave::hammer(op, n)?;
                    return Err(Error::Unavailable(format!(
                        "hammered: {ok} ok, {refused} refused; last refusal: {last:?}"
                    )));
                }
                Mode::Ancestors if key.contains("ancestors") => {
                    let broke = misbehave::ancestors()?;
                    return Err(Error::Unavailable(format!("ancestors: broke {broke:?}")));
                }
                _ => {}
            }
        }
        store::stat(&key)
    }

    fn update(info: Info, fieldpaths: Vec<String>) -> Result<Info, Error> {
        misbehave::common(Call::new("update", &[&info.name]));
        store::update(info, &fieldpaths)
    }

    fn usage(key: String) -> Result<UsageInfo, Error> {
        let call = Call::new("usage", &[&key]);
        misbehave::common(call);
        if call.targeted() && config::get().mode == Mode::HugeUsage {
            store::usage(&key)?;
            return Ok(UsageInfo { size: u64::MAX, inodes: u64::MAX });
        }
        store::usage(&key)
    }

    fn mounts(key: String) -> Result<Vec<Mount>, Error> {
        let call = Call::new("mounts", &[&key]);
        misbehave::common(call);
        let mounts = store::mounts(&key)?;
        Ok(bad_if_asked(call, &key, mounts))
    }

    fn prepare(key: String, parent: Option<String>, labels: Labels) -> Result<Vec<Mount>, Error> {
        let call = Call::new("prepare", &[&key]);
        misbehave::common(call);
        let mounts = store::create(&key, parent.as_deref(), labels, Kind::Active)?;
        if key.contains("victim") {
            misbehave::set_victim(store::layer_of(&key)?)?;
        }
        Ok(bad_if_asked(call, &key, mounts))
    }

    fn view(key: String, parent: Option<String>, labels: Labels) -> Result<Vec<Mount>, Error> {
        let call = Call::new("view", &[&key]);
        misbehave::common(call);
        let mounts = store::create(&key, parent.as_deref(), labels, Kind::View)?;
        Ok(bad_if_asked(call, &key, mounts))
    }

    fn commit(name: String, key: String, labels: Labels) -> Result<(), Error> {
        misbehave::common(Call::new("commit", &[&name, &key]));
        store::commit(&name, &key, labels)
    }

    fn remove(key: String) -> Result<(), Error> {
        misbehave::common(Call::new("remove", &[&key]));
        store::remove(&key)
    }

    fn list(after: Option<String>, limit: u32) -> Result<Vec<Info>, Error> {
        let call = Call::new("list", &[]);
        misbehave::common(call);
        match config::get() {
            Config { mode: Mode::HugeWalk(walk), .. } if call.targeted() => {
                Ok(misbehave::walk(walk, after.as_deref(), limit))
            }
            _ => store::list(after.as_deref(), limit),
        }
    }

    fn cleanup() -> Result<(), Error> {
        misbehave::common(Call::new("cleanup", &[]));
        Ok(())
    }
}

/// In mode `bad-mount`, swaps the good mounts of `key` for the bad ones its name asks for.
fn bad_if_asked(call: Call<'_>, key: &str, mounts: Vec<Mount>) -> Vec<Mount> {
    if config::get().mode != Mode::BadMount || !call.targeted() {
        return mounts;
    }
    match store::layer_of(key) {
        Ok(own) => misbehave::bad_mount(key, own, mounts),
        Err(_) => mounts,
    }
}
