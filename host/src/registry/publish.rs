//! Publishing a module with the checks every face (CLI and HTTP) applies.

use crate::registry::signing::TrustedKeys;
use crate::registry::{Publication, Registry};
use crate::{Error, Runtime};

/// Publishes with the checks both faces (CLI and HTTP) apply: a published
/// module may not take the name of a standard one, and the trusted keys are
/// read fresh, so a key the operator just trusted counts at once.
pub fn publish_checked(
    registry: &Registry,
    rt_or_sandbox: &dyn PublishHost,
    wasm: &[u8],
    manifest_toml: &str,
    signature: Option<&str>,
) -> Result<crate::registry::Entry, Error> {
    let name = toml::from_str::<crate::policy::Manifest>(manifest_toml)
        .map(|m| m.name)
        .unwrap_or_default();
    if crate::installed_modules(rt_or_sandbox.paths())
        .iter()
        .any(|m| m.name == name)
    {
        return Err(Error::config(format!(
            "`{name}` is the name of a standard module: choose another `name` in the manifest"
        )));
    }
    if rt_or_sandbox.member_ids().contains(&name) {
        return Err(Error::config(format!(
            "`{name}` is the id of a pool member: choose another `name` in the manifest"
        )));
    }
    let trusted = TrustedKeys::load(&registry.dir().join("trusted-keys"))?;
    registry.publish(
        rt_or_sandbox.sandbox(),
        &trusted,
        Publication {
            wasm,
            manifest_toml,
            signature: signature.map(str::as_bytes),
        },
    )
}

/// What publishing needs from its caller: a sandbox to validate and
/// precompile with, and the paths (to see the standard modules).
pub trait PublishHost {
    /// The sandbox.
    fn sandbox(&self) -> &crate::sandbox::Sandbox;
    /// The paths.
    fn paths(&self) -> &crate::Paths;
    /// The pool's member ids, which no module may take (none without a pool).
    fn member_ids(&self) -> Vec<String> {
        Vec::new()
    }
}

impl PublishHost for Runtime {
    fn member_ids(&self) -> Vec<String> {
        self.cards().into_iter().map(|c| c.id).collect()
    }
    fn sandbox(&self) -> &crate::sandbox::Sandbox {
        Runtime::sandbox(self)
    }
    fn paths(&self) -> &crate::Paths {
        Runtime::paths(self)
    }
}

/// A sandbox without a pool, for the CLI's `modules publish`.
pub struct SandboxHost {
    /// The sandbox.
    pub sandbox: crate::sandbox::Sandbox,
    /// The paths.
    pub paths: crate::Paths,
}

impl PublishHost for SandboxHost {
    fn sandbox(&self) -> &crate::sandbox::Sandbox {
        &self.sandbox
    }
    fn paths(&self) -> &crate::Paths {
        &self.paths
    }
}
