//! Tenants: who may call the service, with which key, under which limits.
//!
//! An API key is shown once, when the tenant is made; only its sha256 is
//! stored, so a leaked database does not leak keys. Keys are 32 random
//! bytes, so a plain (unsalted) hash is enough: there is no dictionary to
//! try.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{now_unix, Registry};
use crate::Error;

/// What one tenant may do. Limits of 0 mean "no limit".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPolicy {
    /// Systems (strategy modules) it may call; `["*"]` = all.
    pub modules: Vec<String>,
    /// Pool members it may call directly, and that strategies it runs may
    /// use; `["*"]` = all (the operator policy still applies).
    pub members: Vec<String>,
    /// Requests per rolling minute.
    pub requests_per_minute: u32,
    /// Tokens (prompt + completion) per UTC day.
    pub tokens_per_day: u64,
    /// Requests in flight at once.
    pub max_concurrent: u32,
    /// May publish and remove modules.
    pub admin: bool,
}

impl Default for TenantPolicy {
    fn default() -> Self {
        TenantPolicy {
            modules: vec!["*".into()],
            members: vec!["*".into()],
            requests_per_minute: 60,
            tokens_per_day: 1_000_000,
            max_concurrent: 4,
            admin: false,
        }
    }
}

impl TenantPolicy {
    /// Whether the list admits `name`.
    pub fn allows(list: &[String], name: &str) -> bool {
        list.iter().any(|m| m == "*" || m == name)
    }
}

/// A tenant as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tenant {
    /// Its name.
    pub name: String,
    /// Its limits.
    pub policy: TenantPolicy,
}

/// sha256 of an API key, as stored.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The UTC day number of a Unix time (days since 1970-01-01).
pub fn day_of(unix: i64) -> i64 {
    unix.div_euclid(86_400)
}

impl Registry {
    /// Makes a tenant and returns its API key (shown once, never stored).
    pub fn add_tenant(&self, name: &str, policy: &TenantPolicy) -> Result<String, Error> {
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::config(format!(
                "tenant name `{name}`: use 1-64 characters of letters, digits, `-` and `_`"
            )));
        }
        let key = format!("tsk-{}", hex::encode(rand::random::<[u8; 32]>()));
        let policy_json = serde_json::to_string(policy).map_err(|e| Error::config(e.to_string()))?;
        if !self.store.add_tenant(name, &hash_key(&key), &policy_json, now_unix())? {
            return Err(Error::config(format!(
                "tenant `{name}` exists: remove it first (`tessera tenants remove {name}`) to issue a new key"
            )));
        }
        Ok(key)
    }

    /// Every tenant, by name.
    pub fn tenants(&self) -> Result<Vec<Tenant>, Error> {
        self.store
            .tenants()?
            .into_iter()
            .map(|(name, p)| Self::tenant(name, &p))
            .collect()
    }

    fn tenant(name: String, policy_json: &str) -> Result<Tenant, Error> {
        let policy = serde_json::from_str(policy_json)
            .map_err(|e| Error::config(format!("registry: tenant `{name}` has a broken policy: {e}")))?;
        Ok(Tenant { name, policy })
    }

    /// The tenant holding this API key, if any.
    pub fn tenant_by_key(&self, key: &str) -> Result<Option<Tenant>, Error> {
        self.store
            .tenant_by_key_hash(&hash_key(key))?
            .map(|(n, p)| Self::tenant(n, &p))
            .transpose()
    }

    /// Removes a tenant (its key stops working at once); `false` if none.
    pub fn remove_tenant(&self, name: &str) -> Result<bool, Error> {
        self.store.remove_tenant(name)
    }

    /// Whether any tenant exists (if none, the server runs open, loopback only).
    pub fn has_tenants(&self) -> Result<bool, Error> {
        Ok(self.store.tenant_count()? > 0)
    }

    /// Tokens `tenant` used on UTC day `day`.
    pub fn tokens_used(&self, tenant: &str, day: i64) -> Result<u64, Error> {
        self.store.tokens_used(tenant, day)
    }

    /// Adds `tokens` to `tenant`'s count for `day`.
    pub fn add_tokens(&self, tenant: &str, day: i64, tokens: u64) -> Result<(), Error> {
        self.store.add_tokens(tenant, day, tokens)
    }
}
